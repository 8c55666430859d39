//! TLS session-ticket keys shared by the replicas through Redis (`[cluster] redis` with a
//! TLS listener), so a client resumes its session on any replica.
//!
//! The ring lives in `shoal:{@tls}:ticket_keys` (JSON, newest first, at most `RING` keys).
//! Every replica runs one script every `POLL`: it returns the ring and, when the newest key
//! is a `PERIOD` old (by Redis' clock) or there is none, first puts the caller's fresh
//! random key in front. Whoever comes first rotates; everyone reads the same ring. A new
//! key seals tickets only once it is `ACTIVATE` old, by which time every replica has read
//! it, so no replica is handed a ticket it cannot open. A replica that has not read the
//! ring for a `PERIOD` drops the shared keys (they would outlive their rotation) and goes
//! back to its own until Redis answers.
//!
//! The secrets sit in Redis in the clear: Redis gets the trust of the certificate keys.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_proxy::metrics::{Counter, Exposition};
use shoal_proxy::tickets::{hex, KeyMaterial, SharedTicketer, NAME_LEN, SECRET_LEN};

const KEY: &str = "shoal:{@tls}:ticket_keys";
/// Rotation period (rustls rotates its own keys every 6 h too).
const PERIOD: Duration = Duration::from_secs(6 * 3600);
/// Keys kept: the one being activated, the one sealing, the previous one.
const RING: usize = 3;
const POLL: Duration = Duration::from_secs(10);
const ACTIVATE: Duration = Duration::from_secs(35);

const SYNC: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('GET', KEYS[1])
local ring = {}
if cur then
  local ok, r = pcall(cjson.decode, cur)
  if ok and type(r) == 'table' then ring = r end
end
if #ring == 0 or now - tonumber(ring[1].created_ms) >= tonumber(ARGV[1]) then
  table.insert(ring, 1, {name = ARGV[2], secret = ARGV[3], created_ms = now})
  while #ring > tonumber(ARGV[4]) do table.remove(ring) end
  cur = cjson.encode(ring)
  redis.call('SET', KEYS[1], cur)
end
return {cur, now}
"#;

#[derive(Serialize, Deserialize)]
struct Stored {
    name: String,
    secret: String,
    created_ms: u64,
}

/// The keys to install from a ring read at `now_ms` (pure): newest first, starting with
/// the newest key that is at least `activate` old (a younger one is kept for opening
/// only, behind it). Malformed entries are skipped.
pub fn keys_in_force(ring_json: &str, now_ms: u64, activate: Duration) -> Vec<KeyMaterial> {
    let Ok(ring) = serde_json::from_str::<Vec<Stored>>(ring_json) else {
        return Vec::new();
    };
    let mut keys: Vec<(u64, KeyMaterial)> = ring
        .iter()
        .filter_map(|s| {
            Some((
                s.created_ms,
                KeyMaterial {
                    name: unhex(&s.name)?.try_into().ok()?,
                    secret: unhex(&s.secret)?.try_into().ok()?,
                },
            ))
        })
        .collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.0));
    // The sealing key goes first; the others (younger or older) only open tickets.
    let Some(ready) = keys
        .iter()
        .position(|(c, _)| now_ms.saturating_sub(*c) >= activate.as_millis() as u64)
        .or((!keys.is_empty()).then_some(0))
    else {
        return Vec::new();
    };
    let sealing = keys.remove(ready).1;
    std::iter::once(sealing)
        .chain(keys.into_iter().map(|(_, k)| k))
        .collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub struct TicketShare {
    redis: crate::redis_call::LazyRedis,
    ticketer: Arc<SharedTicketer>,
    last_ok: Mutex<Option<Instant>>,
    rotations_seen: Counter,
    failures: Counter,
}

impl TicketShare {
    pub fn new(redis: &str, ticketer: Arc<SharedTicketer>) -> Result<Arc<TicketShare>, String> {
        Ok(Arc::new(TicketShare {
            redis: crate::redis_call::LazyRedis::open(redis)?,
            ticketer,
            last_ok: Mutex::new(None),
            rotations_seen: Counter::default(),
            failures: Counter::default(),
        }))
    }

    async fn sync(&self) -> Result<(), String> {
        let mut name = [0u8; NAME_LEN];
        let mut secret = [0u8; SECRET_LEN];
        shoal_proxy::tickets::random(&mut name)?;
        shoal_proxy::tickets::random(&mut secret)?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SYNC)
            .arg(1)
            .arg(KEY)
            .arg(PERIOD.as_millis() as u64)
            .arg(hex(&name))
            .arg(hex(&secret))
            .arg(RING);
        let (ring, now): (String, u64) = self.redis.call(cmd).await?;
        let keys = keys_in_force(&ring, now, ACTIVATE);
        if keys.is_empty() {
            return Err("no usable key in the shared ring".into());
        }
        if self.ticketer.install(&keys) {
            self.rotations_seen.inc();
            tracing::info!(keys = keys.len(), sealing = %hex(&keys[0].name), "TLS ticket keys taken from the cluster");
        }
        *self.last_ok.lock().expect("ticket lock") = Some(Instant::now());
        Ok(())
    }

    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.sync().await {
                self.failures.inc();
                tracing::warn!(error = %e, "TLS ticket keys not synced with the cluster");
                let stale = self
                    .last_ok
                    .lock()
                    .expect("ticket lock")
                    .is_some_and(|t| t.elapsed() >= PERIOD);
                if stale && self.ticketer.install(&[]) {
                    tracing::warn!("shared TLS ticket keys dropped after a rotation period without Redis; this replica uses its own until Redis answers");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
        }
    }
}

impl shoal_proxy::app::Collector for TicketShare {
    fn collect(&self, e: &mut Exposition) {
        e.gauge(
            "shoal_tls_shared_ticket_keys",
            "TLS session-ticket keys shared with the other replicas in use here (0: own keys).",
            &[],
            self.ticketer.installed() as f64,
        );
        e.counter(
            "shoal_tls_ticket_key_changes_total",
            "Changes of the shared TLS ticket key ring taken from the cluster.",
            &[],
            self.rotations_seen.get(),
        );
        e.counter(
            "shoal_tls_ticket_key_sync_failures_total",
            "Failed reads of the shared TLS ticket key ring.",
            &[],
            self.failures.get(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: u8, created_ms: u64) -> String {
        format!(
            r#"{{"name":"{}","secret":"{}","created_ms":{created_ms}}}"#,
            hex(&[n; NAME_LEN]),
            hex(&[n; SECRET_LEN])
        )
    }

    #[test]
    fn a_new_key_seals_only_once_every_replica_has_read_it() {
        let act = Duration::from_secs(35);
        let ring = format!("[{},{}]", stored(2, 100_000), stored(1, 10_000));
        // 10 s after the rotation: key 1 still seals, key 2 already opens.
        let k = keys_in_force(&ring, 110_000, act);
        assert_eq!(k.iter().map(|k| k.name[0]).collect::<Vec<_>>(), [1, 2]);
        // 40 s after it: key 2 seals.
        let k = keys_in_force(&ring, 140_000, act);
        assert_eq!(k.iter().map(|k| k.name[0]).collect::<Vec<_>>(), [2, 1]);
        // The very first key seals at once (nothing older to seal with).
        let k = keys_in_force(&format!("[{}]", stored(1, 10_000)), 10_001, act);
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn malformed_rings_and_entries_are_skipped() {
        assert!(keys_in_force("nope", 0, ACTIVATE).is_empty());
        assert!(keys_in_force("[]", 0, ACTIVATE).is_empty());
        let short = r#"{"name":"0102","secret":"zz","created_ms":1}"#;
        let ring = format!("[{short},{}]", stored(3, 1));
        let k = keys_in_force(&ring, 100_000, ACTIVATE);
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].name, [3; NAME_LEN]);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }
}
