//! `Cache-Control` parsing (RFC 9111 §5.2) for requests and responses.

use http::header::{CACHE_CONTROL, PRAGMA};
use http::HeaderMap;

/// Largest delta-seconds value honoured (RFC 9111 §1.2.2: 2^31).
pub const DELTA_MAX: u64 = 1 << 31;

/// The directives shoal understands. Absent directives are `None`/`false`; for the ones that
/// take an optional field list (`no-cache`, `private`), `Some(vec![])` is the unqualified form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: Option<Vec<String>>,
    pub private: Option<Vec<String>>,
    pub public: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub must_understand: bool,
    /// `max-stale` without a value accepts any staleness (`Some(None)`).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl CacheControl {
    /// Parses every `Cache-Control` field line of `headers` as one list. For requests without
    /// `Cache-Control`, `Pragma: no-cache` counts as `no-cache` (RFC 9111 §5.4).
    pub fn parse(headers: &HeaderMap, request: bool) -> Self {
        let mut cc = CacheControl::default();
        let mut any = false;
        for v in headers.get_all(CACHE_CONTROL) {
            any = true;
            let Ok(s) = v.to_str() else { continue };
            for (name, arg) in split_directives(s) {
                cc.apply(&name, arg);
            }
        }
        if request && !any {
            let pragma_no_cache = headers.get_all(PRAGMA).iter().any(|v| {
                v.to_str().is_ok_and(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("no-cache"))
                })
            });
            if pragma_no_cache {
                cc.no_cache = Some(Vec::new());
            }
        }
        cc
    }

    fn apply(&mut self, name: &str, arg: Option<String>) {
        // The first occurrence of a directive wins (RFC 9111 §4.2.1).
        match name {
            "no-store" => self.no_store = true,
            "no-cache" => {
                if self.no_cache.is_none() {
                    self.no_cache = Some(field_list(arg));
                } else if let (Some(list), None) = (&mut self.no_cache, &arg) {
                    // Unqualified anywhere makes it unqualified.
                    list.clear();
                }
            }
            "private" => {
                if self.private.is_none() {
                    self.private = Some(field_list(arg));
                } else if let (Some(list), None) = (&mut self.private, &arg) {
                    list.clear();
                }
            }
            "public" => self.public = true,
            "max-age" => set_first(&mut self.max_age, delta(arg)),
            "s-maxage" => set_first(&mut self.s_maxage, delta(arg)),
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "must-understand" => self.must_understand = true,
            // An invalid value is ignored rather than allowing unbounded staleness.
            "max-stale" if self.max_stale.is_none() => {
                self.max_stale = match arg {
                    None => Some(None),
                    Some(a) => parse_delta(&a).map(Some),
                };
            }
            "min-fresh" => set_first(&mut self.min_fresh, delta(arg)),
            "only-if-cached" => self.only_if_cached = true,
            "stale-while-revalidate" => {
                if let Some(a) = arg.as_deref().and_then(parse_delta) {
                    set_first(&mut self.stale_while_revalidate, Some(a));
                }
            }
            "stale-if-error" => {
                if let Some(a) = arg.as_deref().and_then(parse_delta) {
                    set_first(&mut self.stale_if_error, Some(a));
                }
            }
            _ => {}
        }
    }

    /// Unqualified `no-cache`.
    pub fn no_cache_all(&self) -> bool {
        self.no_cache.as_ref().is_some_and(|l| l.is_empty())
    }

    /// Unqualified `private`.
    pub fn private_all(&self) -> bool {
        self.private.as_ref().is_some_and(|l| l.is_empty())
    }
}

/// Targeted cache control (RFC 9213): the first of `fields` that `headers` carries as a valid
/// Structured Fields dictionary, read with `Cache-Control` semantics. `None` when none is
/// present or valid: then `Cache-Control` (and `Expires`) apply as usual.
pub fn parse_targeted(headers: &HeaderMap, fields: &[http::HeaderName]) -> Option<CacheControl> {
    fields.iter().find_map(|f| {
        if f == SURROGATE_CONTROL {
            return parse_surrogate(headers);
        }
        let lines: Vec<&str> = headers
            .get_all(f)
            .iter()
            .map(|v| v.to_str().ok())
            .collect::<Option<_>>()?;
        if lines.is_empty() {
            return None;
        }
        let members = sf_dictionary(&lines.join(","))?;
        let mut cc = CacheControl::default();
        for (key, value) in members {
            let arg = match (key.as_str(), value) {
                // Flags are booleans: a bare key (true); any other value voids the directive.
                (_, SfValue::True) => None,
                (
                    "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error",
                    SfValue::Integer(n),
                ) => Some(n.to_string()),
                ("no-cache" | "private", SfValue::Text(fields)) => Some(fields),
                _ => continue,
            };
            if arg.is_none()
                && matches!(
                    key.as_str(),
                    "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
                )
            {
                continue;
            }
            cc.apply(&key, arg);
        }
        Some(cc)
    })
}

/// The Edge Architecture 1.0 field: not a structured field, directive names are case
/// insensitive, and a directive may target one surrogate (`max-age=60;shoal`).
pub const SURROGATE_CONTROL: &str = "surrogate-control";
/// The device token shoal announces in `Surrogate-Capability` and answers to in
/// `Surrogate-Control` targets.
pub const SURROGATE_TOKEN: &str = "shoal";
/// What shoal announces upstream on cached routes (appended to the field).
pub const SURROGATE_CAPABILITY: &str = "shoal=\"Surrogate/1.0\"";

/// `Surrogate-Control`'s directives for shoal: those without a target and those targeted at
/// [`SURROGATE_TOKEN`]; `None` if the field is absent or holds none of them.
fn parse_surrogate(headers: &HeaderMap) -> Option<CacheControl> {
    let (mut mine, mut all) = (Vec::new(), Vec::new());
    for v in headers.get_all(SURROGATE_CONTROL) {
        let s = v.to_str().ok()?;
        for item in split_items(s) {
            match item.rsplit_once(';') {
                Some((d, t)) if !t.contains(['"', '=']) => {
                    if t.trim().eq_ignore_ascii_case(SURROGATE_TOKEN) {
                        mine.push(d);
                    }
                }
                _ => all.push(item),
            }
        }
    }
    // Directives targeted at shoal come first, so they win over untargeted ones (the first
    // occurrence of a directive is the one that counts).
    let mut cc = CacheControl::default();
    let mut any = false;
    for (name, arg) in mine.into_iter().chain(all).flat_map(split_directives) {
        // Only caching directives make the field apply: `content="ESI/1.0"` alone says
        // nothing about storage, and must not switch off the response's Cache-Control.
        if !SURROGATE_DIRECTIVES.contains(&name.as_str()) {
            continue;
        }
        any = true;
        // `max-age=N+M` (Edge Architecture): fresh for N, then usable for M more when the
        // origin fails.
        if let (true, Some((fresh, grace))) = (
            name == "max-age",
            arg.as_deref().and_then(|a| a.split_once('+')),
        ) {
            cc.apply("max-age", Some(fresh.to_string()));
            cc.apply("stale-if-error", Some(grace.to_string()));
            continue;
        }
        cc.apply(&name, arg);
    }
    any.then_some(cc)
}

/// The `Surrogate-Control` directives that say something about storage or freshness.
const SURROGATE_DIRECTIVES: [&str; 10] = [
    "max-age",
    "no-store",
    "no-cache",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
];

/// Splits a field value at top-level commas (not inside quoted strings).
fn split_items(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|i| !i.is_empty());
    out
}

/// A dictionary member's value, as far as cache directives need it.
enum SfValue {
    True,
    Integer(u64),
    /// A string (its content), or anything else that is valid but not of use here.
    Text(String),
    Other,
}

/// Parses an RFC 8941 dictionary (members with parameters); `None` if it is not valid.
fn sf_dictionary(s: &str) -> Option<Vec<(String, SfValue)>> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let key = |i: &mut usize| -> Option<String> {
        let start = *i;
        if !(*i < b.len() && (b[*i].is_ascii_lowercase() || b[*i] == b'*')) {
            return None;
        }
        while *i < b.len()
            && (b[*i].is_ascii_lowercase()
                || b[*i].is_ascii_digit()
                || matches!(b[*i], b'_' | b'-' | b'.' | b'*'))
        {
            *i += 1;
        }
        Some(s[start..*i].to_string())
    };
    let bare = |i: &mut usize| -> Option<SfValue> {
        let c = *b.get(*i)?;
        if c == b'-' || c.is_ascii_digit() {
            let start = *i;
            *i += 1;
            while *i < b.len() && (b[*i].is_ascii_digit() || b[*i] == b'.') {
                *i += 1;
            }
            let t = &s[start..*i];
            if t.contains('.') {
                return t.parse::<f64>().ok().map(|_| SfValue::Other);
            }
            if t.len() > 15 + usize::from(t.starts_with('-')) {
                return None;
            }
            return match t.parse::<i64>().ok()? {
                n if n < 0 => Some(SfValue::Other),
                n => Some(SfValue::Integer(n as u64)),
            };
        }
        if c == b'"' {
            *i += 1;
            let mut v = String::new();
            loop {
                let c = *b.get(*i)?;
                *i += 1;
                match c {
                    b'"' => return Some(SfValue::Text(v)),
                    b'\\' => {
                        let e = *b.get(*i)?;
                        if e != b'"' && e != b'\\' {
                            return None;
                        }
                        v.push(e as char);
                        *i += 1;
                    }
                    0x20..=0x7e => v.push(c as char),
                    _ => return None,
                }
            }
        }
        if c == b'?' {
            let v = *b.get(*i + 1)?;
            *i += 2;
            return match v {
                b'1' => Some(SfValue::True),
                b'0' => Some(SfValue::Other),
                _ => None,
            };
        }
        if c == b':' {
            *i += 1;
            while *i < b.len() && b[*i] != b':' {
                if !(b[*i].is_ascii_alphanumeric() || matches!(b[*i], b'+' | b'/' | b'=')) {
                    return None;
                }
                *i += 1;
            }
            b.get(*i)?;
            *i += 1;
            return Some(SfValue::Other);
        }
        if c.is_ascii_alphabetic() || c == b'*' {
            while *i < b.len()
                && (b[*i].is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b[*i]))
            {
                *i += 1;
            }
            return Some(SfValue::Other);
        }
        None
    };
    ows(&mut i);
    while i < b.len() {
        let k = key(&mut i)?;
        let value = if b.get(i) == Some(&b'=') {
            i += 1;
            if b.get(i) == Some(&b'(') {
                // An inner list: valid, but no cache directive takes one.
                i += 1;
                loop {
                    ows(&mut i);
                    match b.get(i)? {
                        b')' => {
                            i += 1;
                            break;
                        }
                        _ => {
                            bare(&mut i)?;
                        }
                    }
                }
                SfValue::Other
            } else {
                bare(&mut i)?
            }
        } else {
            SfValue::True
        };
        // Parameters are allowed and ignored.
        while b.get(i) == Some(&b';') {
            i += 1;
            ows(&mut i);
            key(&mut i)?;
            if b.get(i) == Some(&b'=') {
                i += 1;
                bare(&mut i)?;
            }
        }
        // A later duplicate overrides an earlier one (RFC 8941 §4.2.2).
        out.retain(|(n, _)| *n != k);
        out.push((k, value));
        ows(&mut i);
        if i == b.len() {
            break;
        }
        if b[i] != b',' {
            return None;
        }
        i += 1;
        ows(&mut i);
        if i == b.len() {
            return None;
        }
    }
    Some(out)
}

fn set_first(slot: &mut Option<u64>, v: Option<u64>) {
    if slot.is_none() {
        *slot = v;
    }
}

/// A directive whose value must be delta-seconds: an invalid or missing value counts as 0,
/// which errs on the side of staleness (RFC 9111 §4.2.1, §1.2.2).
fn delta(arg: Option<String>) -> Option<u64> {
    Some(arg.as_deref().and_then(parse_delta).unwrap_or(0))
}

/// delta-seconds: digits only, saturating at 2^31.
pub fn parse_delta(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = s.trim_start_matches('0');
    if digits.len() > 10 {
        return Some(DELTA_MAX);
    }
    Some(digits.parse::<u64>().unwrap_or(0).min(DELTA_MAX))
}

fn field_list(arg: Option<String>) -> Vec<String> {
    arg.map(|a| {
        a.split(',')
            .map(|f| f.trim().to_ascii_lowercase())
            .filter(|f| !f.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Splits `a, b=1, c="x, y"` into lower-cased names and unquoted arguments.
pub fn split_directives(s: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let raw_name = &s[start..i];
        let name = raw_name.trim().to_ascii_lowercase();
        let mut arg = None;
        if i < b.len() && b[i] == b'=' {
            i += 1;
            // `name = value` is not the directive syntax (no whitespace around `=`): the
            // value is kept invalid, so a delta-seconds directive counts as 0.
            let spaced = raw_name.ends_with([' ', '\t'])
                || b.get(i).is_some_and(|&c| c == b' ' || c == b'\t');
            if spaced {
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                out.push((name, Some(String::from("invalid"))));
                continue;
            }
            if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    v.push(b[i] as char);
                    i += 1;
                }
                i += 1; // closing quote
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                arg = Some(v);
            } else {
                let vs = i;
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                arg = Some(s[vs..i].trim().to_string());
            }
        }
        if !name.is_empty() {
            out.push((name, arg));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cc(v: &str) -> CacheControl {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        CacheControl::parse(&h, false)
    }

    #[test]
    fn parses_values_lists_and_quotes() {
        let c = cc("public, max-age=60, s-maxage=\"30\", no-cache=\"Set-Cookie, X-A\"");
        assert!(c.public);
        assert_eq!(c.max_age, Some(60));
        assert_eq!(c.s_maxage, Some(30));
        assert_eq!(c.no_cache, Some(vec!["set-cookie".into(), "x-a".into()]));
        assert!(!c.no_cache_all());
    }

    #[test]
    fn invalid_max_age_is_zero_and_first_wins() {
        assert_eq!(cc("max-age=abc").max_age, Some(0));
        assert_eq!(cc("max-age=10, max-age=99").max_age, Some(10));
        assert_eq!(cc("max-age=99999999999999").max_age, Some(DELTA_MAX));
        assert_eq!(cc("max-stale").max_stale, Some(None));
        assert_eq!(cc("max-stale=5").max_stale, Some(Some(5)));
        assert_eq!(cc("max-stale=x").max_stale, None);
    }

    #[test]
    fn pragma_no_cache_only_without_cache_control() {
        let mut h = HeaderMap::new();
        h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(CacheControl::parse(&h, true).no_cache_all());
        assert!(CacheControl::parse(&h, false).no_cache.is_none());
        h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        assert!(CacheControl::parse(&h, true).no_cache.is_none());
    }
}
