//! A cached URL (all its `Vary` variants) and its versioned binary form for the Redis tier.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::policy::{compute_meta, strip_hop_by_hop, vary_matches, PolicyConfig, StoredResponse};

/// Variants kept per URL; the oldest goes first (bounds `Vary: User-Agent` style blow-ups).
pub const MAX_VARIANTS: usize = 16;

/// Everything stored under one primary key.
#[derive(Debug, Clone)]
pub struct Entry {
    pub variants: Vec<Arc<StoredResponse>>,
}

impl Entry {
    pub fn single(v: StoredResponse) -> Self {
        Entry {
            variants: vec![Arc::new(v)],
        }
    }

    /// The variant that matches the request's `Vary` fields (§4.1), most recent first.
    pub fn find(&self, req_headers: &HeaderMap) -> Option<&Arc<StoredResponse>> {
        self.variants
            .iter()
            .rev()
            .find(|v| vary_matches(v, req_headers))
    }

    /// This entry with `v` replacing the variant with the same secondary key (§4.1: the most
    /// recent response for a set of field values wins).
    pub fn with_variant(&self, v: StoredResponse) -> Entry {
        let mut variants: Vec<Arc<StoredResponse>> = self
            .variants
            .iter()
            .filter(|old| old.vary != v.vary)
            .cloned()
            .collect();
        variants.push(Arc::new(v));
        if variants.len() > MAX_VARIANTS {
            let drop = variants.len() - MAX_VARIANTS;
            variants.drain(..drop);
        }
        Entry { variants }
    }

    pub fn weight(&self) -> usize {
        self.variants.iter().map(|v| v.weight()).sum()
    }

    pub fn has_surrogate_key(&self, key: &str) -> bool {
        self.variants
            .iter()
            .any(|v| v.surrogate_keys.iter().any(|k| k == key))
    }

    pub fn surrogate_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .variants
            .iter()
            .flat_map(|v| v.surrogate_keys.iter().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// How long the tiers keep it: the longest of its variants.
    pub fn keep_for(&self, now: SystemTime, cfg: &PolicyConfig) -> Duration {
        self.variants
            .iter()
            .map(|v| v.keep_for(now, cfg))
            .max()
            .unwrap_or(Duration::from_secs(1))
    }
}

const MAGIC: &[u8; 4] = b"SHC\0";
/// Bumped whenever the layout changes; other versions read as misses. Version 2 carries the
/// freshness computed when the object was stored (the route's `max_ttl` included).
pub const FORMAT_VERSION: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a shoal cache object")]
    Magic,
    #[error("cache object format {0}, expected {FORMAT_VERSION}")]
    Version(u8),
    #[error("truncated or corrupt cache object")]
    Corrupt,
}

/// Serialises an entry: magic, version, then per variant its status, times, headers, `Vary`
/// values, surrogate keys and body; integers big-endian, strings length-prefixed.
pub fn encode(e: &Entry) -> Vec<u8> {
    let size: usize = e.variants.iter().map(|v| v.weight()).sum::<usize>() + 16;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    put_u16(&mut out, e.variants.len() as u16);
    for v in &e.variants {
        put_u16(&mut out, v.status.as_u16());
        put_u64(&mut out, millis(v.request_time));
        put_u64(&mut out, millis(v.response_time));
        put_u64(&mut out, v.age_value);
        put_u64(&mut out, v.meta.lifetime);
        out.push(
            u8::from(v.meta.heuristic)
                | u8::from(v.meta.no_stale) << 1
                | u8::from(v.meta.no_cache) << 2,
        );
        put_u64(&mut out, v.meta.stale_while_revalidate);
        put_u64(&mut out, v.meta.stale_if_error);
        put_u32(&mut out, v.headers.len() as u32);
        for (n, val) in v.headers.iter() {
            put_bytes(&mut out, n.as_str().as_bytes());
            put_bytes(&mut out, val.as_bytes());
        }
        put_u16(&mut out, v.vary.len() as u16);
        for (n, val) in &v.vary {
            put_bytes(&mut out, n.as_str().as_bytes());
            match val {
                None => out.push(0),
                Some(s) => {
                    out.push(1);
                    put_bytes(&mut out, s.as_bytes());
                }
            }
        }
        put_u16(&mut out, v.surrogate_keys.len() as u16);
        for k in &v.surrogate_keys {
            put_bytes(&mut out, k.as_bytes());
        }
        put_bytes(&mut out, &v.body);
    }
    out
}

pub fn decode(b: &[u8], cfg: &PolicyConfig) -> Result<Entry, DecodeError> {
    if b.len() < 5 || &b[..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if b[4] != FORMAT_VERSION {
        return Err(DecodeError::Version(b[4]));
    }
    let mut r = Reader { b, i: 5 };
    let n = r.u16()?;
    let mut variants = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Corrupt)?;
        let request_time = UNIX_EPOCH + Duration::from_millis(r.u64()?);
        let response_time = UNIX_EPOCH + Duration::from_millis(r.u64()?);
        let age_value = r.u64()?;
        let lifetime = r.u64()?;
        let flags = r.u8()?;
        let stale_while_revalidate = r.u64()?;
        let stale_if_error = r.u64()?;
        let nh = r.u32()?;
        let mut headers = HeaderMap::new();
        for _ in 0..nh {
            let name = HeaderName::from_bytes(r.bytes()?).map_err(|_| DecodeError::Corrupt)?;
            let val = HeaderValue::from_bytes(r.bytes()?).map_err(|_| DecodeError::Corrupt)?;
            headers.append(name, val);
        }
        let nv = r.u16()?;
        let mut vary = Vec::with_capacity(nv as usize);
        for _ in 0..nv {
            let name = HeaderName::from_bytes(r.bytes()?).map_err(|_| DecodeError::Corrupt)?;
            let val = match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                _ => return Err(DecodeError::Corrupt),
            };
            vary.push((name, val));
        }
        let nk = r.u16()?;
        let mut surrogate_keys = Vec::with_capacity(nk as usize);
        for _ in 0..nk {
            surrogate_keys.push(r.string()?);
        }
        let body = Bytes::copy_from_slice(r.bytes()?);
        // Another process wrote this: it is served only as a response shoal would store.
        if !(200..=599).contains(&status.as_u16())
            || status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Err(DecodeError::Corrupt);
        }
        strip_hop_by_hop(&mut headers);
        for n in [
            http::header::CONTENT_LENGTH,
            http::header::SET_COOKIE,
            http::header::AGE,
        ] {
            headers.remove(n);
        }
        if status != StatusCode::NO_CONTENT {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        // Validators and dates come from the headers; the freshness decided at store time
        // stays as it was (the route's settings, not the reader's defaults).
        // Values are bounded like delta-seconds, and the flags can only add to what the
        // headers themselves say (a written object never loosens must-revalidate).
        let mut meta = compute_meta(cfg, status, &headers);
        let max = crate::directives::DELTA_MAX;
        meta.lifetime = lifetime.min(max);
        meta.heuristic = flags & 1 != 0;
        meta.no_stale |= flags & 2 != 0;
        meta.no_cache |= flags & 4 != 0;
        meta.stale_while_revalidate = stale_while_revalidate.min(max);
        meta.stale_if_error = stale_if_error.min(max);
        variants.push(Arc::new(StoredResponse {
            status,
            headers,
            body,
            request_time,
            response_time,
            age_value,
            vary,
            surrogate_keys,
            meta,
            h1: Default::default(),
        }));
    }
    if r.i != b.len() || variants.is_empty() {
        return Err(DecodeError::Corrupt);
    }
    Ok(Entry { variants })
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn put_u16(o: &mut Vec<u8>, v: u16) {
    o.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(o: &mut Vec<u8>, v: u32) {
    o.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(o: &mut Vec<u8>, v: u64) {
    o.extend_from_slice(&v.to_be_bytes());
}
fn put_bytes(o: &mut Vec<u8>, b: &[u8]) {
    put_u32(o, b.len() as u32);
    o.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.i.checked_add(n).ok_or(DecodeError::Corrupt)?;
        let s = self.b.get(self.i..end).ok_or(DecodeError::Corrupt)?;
        self.i = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::to_stored;
    use http::Method;

    fn sample() -> Entry {
        let mut req = HeaderMap::new();
        req.insert("accept-encoding", HeaderValue::from_static("gzip"));
        let mut resp = HeaderMap::new();
        resp.insert("cache-control", HeaderValue::from_static("max-age=60"));
        resp.insert(
            "vary",
            HeaderValue::from_static("Accept-Encoding, X-Absent"),
        );
        resp.insert("etag", HeaderValue::from_static("\"v1\""));
        resp.insert("surrogate-key", HeaderValue::from_static("a b"));
        resp.append("x-multi", HeaderValue::from_static("1"));
        resp.append("x-multi", HeaderValue::from_static("2"));
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let s = to_stored(
            &PolicyConfig::default(),
            &Method::GET,
            &req,
            StatusCode::OK,
            &resp,
            Bytes::from_static(b"hello"),
            t,
            t,
        )
        .unwrap();
        Entry::single(s)
    }

    #[test]
    fn round_trips() {
        let e = sample();
        let d = decode(&encode(&e), &PolicyConfig::default()).unwrap();
        let (a, b) = (&e.variants[0], &d.variants[0]);
        assert_eq!(a.status, b.status);
        assert_eq!(a.headers, b.headers);
        assert_eq!(a.body, b.body);
        assert_eq!(a.vary, b.vary);
        assert_eq!(a.surrogate_keys, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(a.surrogate_keys, b.surrogate_keys);
        assert_eq!(a.response_time, b.response_time);
        assert_eq!(b.meta.lifetime, 60);
    }

    #[test]
    fn stored_freshness_survives_a_round_trip_whatever_the_reader_settings() {
        let mut e = sample();
        let mut v = (*e.variants[0]).clone();
        // As if the route capped it with max_ttl = 5s.
        v.meta.lifetime = 5;
        e.variants[0] = Arc::new(v);
        let reader = PolicyConfig {
            max_ttl: Duration::ZERO,
            ..PolicyConfig::default()
        };
        let d = decode(&encode(&e), &reader).unwrap();
        assert_eq!(d.variants[0].meta.lifetime, 5);
        assert_eq!(d.variants[0].meta.etag, e.variants[0].meta.etag);
    }

    #[test]
    fn decoded_objects_are_sanitized() {
        let mut e = sample();
        let mut v = (*e.variants[0]).clone();
        v.headers
            .insert("transfer-encoding", HeaderValue::from_static("chunked"));
        v.headers
            .insert("content-length", HeaderValue::from_static("999"));
        v.headers
            .insert("connection", HeaderValue::from_static("x-secret"));
        v.headers.insert("x-secret", HeaderValue::from_static("1"));
        v.headers
            .insert("set-cookie", HeaderValue::from_static("sid=1"));
        e.variants[0] = Arc::new(v);
        let d = decode(&encode(&e), &PolicyConfig::default()).unwrap();
        let h = &d.variants[0].headers;
        for gone in ["transfer-encoding", "connection", "x-secret", "set-cookie"] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["content-length"], "5");
        // Statuses shoal never stores read as corrupt.
        for status in [101u16, 206, 304, 600] {
            let mut e = sample();
            let mut v = (*e.variants[0]).clone();
            v.status = StatusCode::from_u16(status).unwrap();
            e.variants[0] = Arc::new(v);
            assert_eq!(
                decode(&encode(&e), &PolicyConfig::default()).unwrap_err(),
                DecodeError::Corrupt,
                "{status}"
            );
        }
    }

    #[test]
    fn rejects_other_versions_and_truncation() {
        let mut b = encode(&sample());
        let cfg = PolicyConfig::default();
        for cut in [0, 3, 5, 20, b.len() - 1] {
            assert!(decode(&b[..cut], &cfg).is_err(), "cut {cut}");
        }
        b[4] = FORMAT_VERSION + 1;
        assert_eq!(
            decode(&b, &cfg).unwrap_err(),
            DecodeError::Version(FORMAT_VERSION + 1)
        );
        assert_eq!(decode(b"junk!", &cfg).unwrap_err(), DecodeError::Magic);
    }
}
