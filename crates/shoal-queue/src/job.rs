//! The job model: what a submitted request becomes on the wire, and what the store keeps.
//!
//! Both encodings are small length-prefixed binary formats with a leading version/tag byte,
//! so bodies travel as bytes (no base64) and a record from a newer shoal is rejected clearly
//! instead of being misread.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// A request captured for asynchronous execution (the proxy's async phase builds it).
pub use shoal_proxy::jobs::JobRequest;

/// A job as published to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    /// Unix time of the accepted submission, for end-to-end latency.
    pub submitted_ms: u64,
    /// The store key of the idempotency key that made this job (scoped and hashed): the
    /// dispatcher starts its lifetime when the job ends, as it does the result's.
    pub key: Option<String>,
    pub request: JobRequest,
}

/// A worker's answer, kept until its TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
}

/// What the store knows about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobRecord {
    /// Accepted (the broker confirmed it) and not finished yet.
    Pending { submitted_ms: u64 },
    /// A worker answered; this is the result clients fetch.
    Done {
        submitted_ms: u64,
        finished_ms: u64,
        attempts: u32,
        response: StoredResponse,
    },
    /// The job went to the dead-letter queue with this error: every attempt failed (502),
    /// or a worker's answer was too big (502) or late (504), which is not run again.
    Failed {
        submitted_ms: u64,
        finished_ms: u64,
        attempts: u32,
        /// What `GET /jobs/{id}` answers.
        status: u16,
        error: String,
    },
}

impl JobRecord {
    /// Done or failed: a delivery of this job again is a duplicate.
    pub fn is_final(&self) -> bool {
        !matches!(self, JobRecord::Pending { .. })
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct DecodeError {
    pub what: &'static str,
    pub why: &'static str,
}

/// A new random job id: 128 bits as 32 hex digits (unguessable, since the id is the only
/// capability needed to read a result).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    // getrandom only fails without an OS entropy source; fall back to time and a counter so a
    // submission never fails for it (ids then stay unique, just guessable).
    if getrandom::fill(&mut b).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let t = now_ms().to_le_bytes();
        let n = N.fetch_add(1, Ordering::Relaxed).to_le_bytes();
        b[..8].copy_from_slice(&t);
        b[8..].copy_from_slice(&n);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// True for ids [`new_id`] could have made (so `/jobs/{id}` never queries a store with junk).
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const ENVELOPE_V1: u8 = 1;
/// v1 + the idempotency key's store key.
const ENVELOPE_V2: u8 = 2;
const TAG_PENDING: u8 = 1;
const TAG_DONE: u8 = 2;
/// A failure without a status (written by older versions): read as 502.
const TAG_FAILED_V1: u8 = 3;
const TAG_FAILED: u8 = 4;

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let r = &self.request;
        let mut w = Writer(Vec::with_capacity(64 + r.body.len()));
        w.u8(ENVELOPE_V2);
        w.bytes(self.id.as_bytes());
        w.u64(self.submitted_ms);
        w.bytes(self.key.as_deref().unwrap_or("").as_bytes());
        w.bytes(r.method.as_bytes());
        w.bytes(r.path_and_query.as_bytes());
        w.headers(&r.headers);
        w.bytes(&r.body);
        w.0
    }

    pub fn decode(b: &[u8]) -> Result<Envelope, DecodeError> {
        let mut r = Reader::new(b, "job");
        let version = r.u8()?;
        if version != ENVELOPE_V1 && version != ENVELOPE_V2 {
            return Err(r.err("unknown version"));
        }
        let id = r.string()?;
        let submitted_ms = r.u64()?;
        let key = match version {
            ENVELOPE_V1 => None,
            _ => Some(r.string()?).filter(|k| !k.is_empty()),
        };
        let method = r.string()?;
        let path_and_query = r.string()?;
        let headers = r.headers()?;
        let body = Bytes::copy_from_slice(r.bytes()?);
        r.end()?;
        Ok(Envelope {
            id,
            submitted_ms,
            key,
            request: JobRequest {
                method,
                path_and_query,
                headers,
                body,
            },
        })
    }
}

impl JobRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            JobRecord::Pending { submitted_ms } => {
                w.u8(TAG_PENDING);
                w.u64(*submitted_ms);
            }
            JobRecord::Done {
                submitted_ms,
                finished_ms,
                attempts,
                response,
            } => {
                w.u8(TAG_DONE);
                w.u64(*submitted_ms);
                w.u64(*finished_ms);
                w.u32(*attempts);
                w.u32(response.status as u32);
                w.headers(&response.headers);
                w.bytes(&response.body);
            }
            JobRecord::Failed {
                submitted_ms,
                finished_ms,
                attempts,
                status,
                error,
            } => {
                w.u8(TAG_FAILED);
                w.u64(*submitted_ms);
                w.u64(*finished_ms);
                w.u32(*attempts);
                w.u32(*status as u32);
                w.bytes(error.as_bytes());
            }
        }
        w.0
    }

    pub fn decode(b: &[u8]) -> Result<JobRecord, DecodeError> {
        let mut r = Reader::new(b, "job record");
        let rec = match r.u8()? {
            TAG_PENDING => JobRecord::Pending {
                submitted_ms: r.u64()?,
            },
            TAG_DONE => {
                let submitted_ms = r.u64()?;
                let finished_ms = r.u64()?;
                let attempts = r.u32()?;
                let status = u16::try_from(r.u32()?).map_err(|_| r.err("status"))?;
                let headers = r.headers()?;
                let body = Bytes::copy_from_slice(r.bytes()?);
                JobRecord::Done {
                    submitted_ms,
                    finished_ms,
                    attempts,
                    response: StoredResponse {
                        status,
                        headers,
                        body,
                    },
                }
            }
            TAG_FAILED_V1 => JobRecord::Failed {
                submitted_ms: r.u64()?,
                finished_ms: r.u64()?,
                attempts: r.u32()?,
                status: 502,
                error: r.string()?,
            },
            TAG_FAILED => JobRecord::Failed {
                submitted_ms: r.u64()?,
                finished_ms: r.u64()?,
                attempts: r.u32()?,
                status: u16::try_from(r.u32()?).map_err(|_| r.err("status"))?,
                error: r.string()?,
            },
            _ => return Err(r.err("unknown tag")),
        };
        r.end()?;
        Ok(rec)
    }
}

/// True when the first byte says "final record" (used by the Redis script, which cannot
/// decode records).
pub const FINAL_TAGS: [u8; 3] = [TAG_DONE, TAG_FAILED_V1, TAG_FAILED];

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn headers(&mut self, h: &[(String, Bytes)]) {
        self.u32(h.len() as u32);
        for (k, v) in h {
            self.bytes(k.as_bytes());
            self.bytes(v);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }
    fn err(&self, why: &'static str) -> DecodeError {
        DecodeError {
            what: self.what,
            why,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(self.err("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("not UTF-8"))
    }
    fn headers(&mut self) -> Result<Vec<(String, Bytes)>, DecodeError> {
        let n = self.u32()? as usize;
        // Each header takes at least 8 bytes: refuse counts the input cannot hold.
        if n > self.b.len() / 8 {
            return Err(self.err("header count"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.string()?;
            let v = Bytes::copy_from_slice(self.bytes()?);
            out.push((k, v));
        }
        Ok(out)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            id: new_id(),
            submitted_ms: 1_700_000_000_123,
            key: Some("q:id:key".into()),
            request: JobRequest {
                method: "POST".into(),
                path_and_query: "/async/work?cpu_ms=5".into(),
                headers: vec![
                    ("content-type".into(), Bytes::from_static(b"text/plain")),
                    ("x-bin".into(), Bytes::from_static(&[0, 255, 10])),
                ],
                body: Bytes::from_static(b"hello\0world"),
            },
        }
    }

    #[test]
    fn envelope_round_trips_and_rejects_damage() {
        let e = env();
        let b = e.encode();
        assert_eq!(Envelope::decode(&b).unwrap(), e);
        for cut in 0..b.len() {
            assert!(Envelope::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(Envelope::decode(&extra).is_err());
        let mut v3 = b;
        v3[0] = 3;
        assert!(Envelope::decode(&v3).is_err());
    }

    #[test]
    fn records_round_trip() {
        let recs = [
            JobRecord::Pending { submitted_ms: 5 },
            JobRecord::Done {
                submitted_ms: 5,
                finished_ms: 9,
                attempts: 2,
                response: StoredResponse {
                    status: 201,
                    headers: vec![("a".into(), Bytes::from_static(b"b"))],
                    body: Bytes::from_static(b"done"),
                },
            },
            JobRecord::Failed {
                submitted_ms: 5,
                finished_ms: 9,
                attempts: 3,
                status: 504,
                error: "worker answered 500".into(),
            },
        ];
        for r in recs {
            let b = r.encode();
            assert_eq!(JobRecord::decode(&b).unwrap(), r);
            assert_eq!(FINAL_TAGS.contains(&b[0]), r.is_final());
        }
    }

    #[test]
    fn ids_are_distinct_and_valid() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert!(valid_id(&a) && valid_id(&b));
        assert!(!valid_id("../etc") && !valid_id(""));
    }
}
