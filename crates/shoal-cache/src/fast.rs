//! Fresh hits for shoal's HTTP/1.1 fast path: request headers as `httparse` parsed them (no
//! header map), the response head rendered once per stored object and reused.

use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::header;
use http::{HeaderValue, Method};

use crate::cache::{Cache, STATUS_NAME};
use crate::directives::CacheControl;
use crate::metrics::Outcome as Count;
use crate::policy::{self, Reuse, StoredResponse};

/// Request fields that make a request more than a plain lookup; such requests take
/// [`Cache::lookup`] instead.
const NOT_FAST: [&str; 9] = [
    "cache-control",
    "pragma",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
    "upgrade",
];

/// A stored response's HTTP/1.1 head without `Age` and `Cache-Status` (they change per hit).
#[derive(Debug, Clone)]
pub struct H1Head {
    head: Bytes,
    upstream_status: Option<HeaderValue>,
}

fn render(v: &StoredResponse) -> H1Head {
    let mut b = BytesMut::with_capacity(256);
    b.put_slice(b"HTTP/1.1 ");
    b.put_slice(v.status.as_str().as_bytes());
    b.put_u8(b' ');
    b.put_slice(v.status.canonical_reason().unwrap_or("").as_bytes());
    b.put_slice(b"\r\n");
    for (n, val) in v.headers.iter() {
        if n == header::AGE || n == policy::CACHE_STATUS {
            continue;
        }
        b.put_slice(n.as_str().as_bytes());
        b.put_slice(b": ");
        b.put_slice(val.as_bytes());
        b.put_slice(b"\r\n");
    }
    H1Head {
        head: b.freeze(),
        upstream_status: v.headers.get(policy::CACHE_STATUS).cloned(),
    }
}

/// A fresh hit ready to write: [`FastHit::write_head`], then `body` (unless HEAD).
#[derive(Debug, Clone)]
pub struct FastHit {
    head: H1Head,
    pub status: u16,
    pub age: u64,
    pub ttl: i64,
    /// The body to send; empty for HEAD.
    pub body: Bytes,
}

impl FastHit {
    /// Appends the complete response head, blank line included; `close` adds
    /// `Connection: close` (the client asked for it).
    pub fn write_head(&self, out: &mut Vec<u8>, close: bool) {
        out.extend_from_slice(&self.head.head);
        out.extend_from_slice(b"age: ");
        out.extend_from_slice(self.age.to_string().as_bytes());
        out.extend_from_slice(b"\r\ncache-status: ");
        if let Some(prev) = &self.head.upstream_status {
            out.extend_from_slice(prev.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(STATUS_NAME.as_bytes());
        out.extend_from_slice(b"; hit; ttl=");
        out.extend_from_slice(self.ttl.to_string().as_bytes());
        if close {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
    }
}

impl Cache {
    /// A fresh hit from the memory tier for a plain GET/HEAD, or `None` (then the request
    /// takes the general path and [`Cache::lookup`]). Never waits, never touches Redis.
    pub fn fast_hit(
        &self,
        method: &Method,
        scheme: &str,
        authority: &str,
        path_and_query: &str,
        headers: &[httparse::Header<'_>],
        now: SystemTime,
    ) -> Option<FastHit> {
        if *method != Method::GET && *method != Method::HEAD {
            return None;
        }
        if headers
            .iter()
            .any(|h| NOT_FAST.iter().any(|n| h.name.eq_ignore_ascii_case(n)))
        {
            return None;
        }
        let key = self.key(scheme, authority, path_and_query);
        let m = self.store().memory_get(&key)?;
        let v = m.entry.variants.iter().rev().find(|v| {
            v.vary.iter().all(|(name, want)| {
                let got = policy::normalize_values(
                    headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name.as_str()))
                        .map(|h| h.value),
                );
                got == *want
            })
        })?;
        if policy::reuse(&self.config().policy, v, &CacheControl::default(), now) != Reuse::Fresh {
            return None;
        }
        self.counters().inc(Count::Hit);
        Some(FastHit {
            head: v.h1.get_or_init(|| render(v)).clone(),
            status: v.status.as_u16(),
            age: v.current_age(now),
            ttl: v.ttl(now),
            body: if *method == Method::HEAD {
                Bytes::new()
            } else {
                v.body.clone()
            },
        })
    }
}
