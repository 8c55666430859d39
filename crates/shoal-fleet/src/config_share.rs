//! One config for every replica (`[cluster] redis` with `share_config = true`).
//!
//! A reload on one replica (SIGHUP, `POST /api/reload`) that read an edited file publishes
//! the file's text as a new version in Redis (`shoal:{@config}:doc`: version, text, Redis
//! time of publication, publisher). Every replica polls the version each second and applies
//! a newer one through the same checks and transaction as a reload; older or equal
//! versions are ignored. What is the replica's own stays its own: the admin listener,
//! `[cluster]` (its identity), `data_dir`, `threads`, `log_format` and each service's
//! `listen` address, so replicas on one host or behind different addresses can share the
//! rest.
//!
//! At start a replica adopts the shared version unless its file was edited since it last
//! read it ([`at_start`]). A SIGHUP on a replica whose file did not change since it was
//! last applied (e.g. to reload certificates) does not put its file over the shared config.
//!
//! Redis is trusted with the config as it is with the fleet: whoever can write the key can
//! change every replica's routes and fleet commands. A Redis outage leaves each replica on
//! the config it has; a publication that failed is retried.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proxy::app::App;
use shoal_proxy::metrics::{Counter, Exposition};
use shoal_proxy::Config;

/// Shared config texts above this are refused (both ways).
const MAX_TEXT: usize = 1 << 20;

const KEY: &str = "shoal:{@config}:doc";

/// Bumps the version and stores the text with Redis' time, in one step.
const PUBLISH: &str = r#"
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'text', ARGV[1], 'at_ms', ms, 'by', ARGV[2])
return v
"#;

/// A shared version as read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    pub version: u64,
    pub text: String,
    /// Redis time of publication, ms since the epoch.
    pub at_ms: u64,
    pub by: String,
}

/// What a starting replica does with its file and the shared version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtStart {
    /// Nothing shared yet, or the file was edited: publish the file.
    Publish,
    /// Apply the shared version.
    Adopt,
    /// The file is the shared version.
    InSync,
}

/// The start rule (pure). `seen` is the file's text as this replica last read it (kept in
/// `data_dir`): a file unchanged since then is not news, so the cluster's version wins
/// (a restarted replica never puts its old file over a newer edit); a file changed since
/// is an edit and is published. With no record (a new replica), the file counts as an
/// edit only if it was modified after the shared version was published.
pub fn at_start(
    local_text: &str,
    seen: Option<&str>,
    file_mtime_ms: Option<u64>,
    shared: Option<&Shared>,
) -> AtStart {
    match (shared, seen) {
        (None, _) => AtStart::Publish,
        (Some(s), _) if s.text == local_text => AtStart::InSync,
        (Some(_), Some(seen)) if seen == local_text => AtStart::Adopt,
        (Some(_), Some(_)) => AtStart::Publish,
        (Some(s), None) if file_mtime_ms.is_some_and(|m| m > s.at_ms) => AtStart::Publish,
        (Some(_), None) => AtStart::Adopt,
    }
}

/// `shared` with what belongs to this replica taken from `local` (pure).
pub fn overlay(local: &Config, mut shared: Config) -> Config {
    shared.source = local.source.clone();
    shared.threads = local.threads;
    shared.log_format = local.log_format;
    shared.data_dir = local.data_dir.clone();
    shared.admin = local.admin.clone();
    shared.cluster = local.cluster.clone();
    for s in &mut shared.services {
        if let Some(l) = local.services.iter().find(|l| l.name == s.name) {
            s.listen = l.listen;
        }
    }
    shared
}

struct State {
    /// The version in force here (0: none).
    applied: u64,
    /// Text of the version in force (the shared one, or the file's once published).
    text: Option<String>,
    /// The file's config as last applied from it (its text, and its own settings that a
    /// shared version keeps).
    local: Config,
    /// Local reloads applied so far: an adoption that saw an older count gives way.
    local_gen: u64,
    /// The shared text being applied right now (the reload hook must not publish it back).
    adopting: Option<String>,
    /// A local text to publish (retried after a failure).
    pending: Option<String>,
    /// A version refused here, and when: retried after `REFUSED_RETRY`.
    refused: Option<(u64, Instant)>,
}

/// A version refused here (e.g. a port still taken, a file not there yet) is tried again
/// after this long.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

pub struct ConfigShare {
    redis: crate::redis_call::LazyRedis,
    id: String,
    state: Mutex<State>,
    /// One publication at a time, in order.
    flushing: tokio::sync::Mutex<()>,
    publishes: Counter,
    adoptions: Counter,
    failures: Counter,
}

impl ConfigShare {
    /// `local`: the config this replica started with (from its file).
    pub fn new(redis: &str, id: &str, local: &Config) -> Result<Arc<ConfigShare>, String> {
        Ok(Arc::new(ConfigShare {
            redis: crate::redis_call::LazyRedis::open(redis)?,
            id: id.to_string(),
            state: Mutex::new(State {
                applied: 0,
                text: None,
                local: local.clone(),
                local_gen: 0,
                adopting: None,
                pending: None,
                refused: None,
            }),
            flushing: tokio::sync::Mutex::new(()),
            publishes: Counter::default(),
            adoptions: Counter::default(),
            failures: Counter::default(),
        }))
    }

    async fn call<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, String> {
        self.redis.call(cmd).await
    }

    async fn version(&self) -> Result<u64, String> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(KEY).arg("version");
        Ok(self.call::<Option<u64>>(cmd).await?.unwrap_or(0))
    }

    async fn read(&self) -> Result<Option<Shared>, String> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(KEY)
            .arg("version")
            .arg("text")
            .arg("at_ms")
            .arg("by");
        let (v, text, at, by): (Option<u64>, Option<String>, Option<u64>, Option<String>) =
            self.call(cmd).await?;
        match (v, text) {
            (Some(version), Some(text)) if text.len() <= MAX_TEXT => Ok(Some(Shared {
                version,
                text,
                at_ms: at.unwrap_or(0),
                by: by.unwrap_or_default(),
            })),
            (Some(_), Some(_)) => Err(format!("shared config over {MAX_TEXT} bytes")),
            _ => Ok(None),
        }
    }

    async fn publish(&self, text: &str) -> Result<u64, String> {
        if text.len() > MAX_TEXT {
            return Err(format!("config over {MAX_TEXT} bytes is not shared"));
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUBLISH).arg(1).arg(KEY).arg(text).arg(&self.id);
        let v: u64 = self.call(cmd).await?;
        self.publishes.inc();
        tracing::info!(version = v, "config published to the other replicas");
        Ok(v)
    }

    /// The reload gate: a file that did not change since it was last applied is not put
    /// over the shared config in force (a SIGHUP for certificates, say).
    pub fn file_read(&self, text: &str) -> bool {
        self.state.lock().expect("share state").local.text != text
    }

    /// After a reload applied `config`: an adoption is recorded; a reload of this
    /// replica's file is published.
    pub fn reloaded(self: &Arc<Self>, config: &Config) {
        let mut s = self.state.lock().expect("share state");
        if s.adopting.as_deref() == Some(config.text.as_str()) {
            s.adopting = None;
            s.text = Some(config.text.clone());
            return;
        }
        s.local_gen += 1;
        s.local = config.clone();
        s.text = Some(config.text.clone());
        s.pending = Some(config.text.clone());
        drop(s);
        let me = self.clone();
        tokio::spawn(async move { me.flush().await });
    }

    /// Keeps the file's text in `data_dir`, for the start rule: once the cluster has it
    /// (published, adopted or in sync), so an edit not yet published still counts as one
    /// at the next start.
    fn remember(&self, data_dir: &Path, text: &str) {
        let write = std::fs::create_dir_all(data_dir)
            .and_then(|()| std::fs::write(data_dir.join(SEEN_FILE), text));
        if let Err(e) = write {
            self.failures.inc();
            tracing::warn!(error = %e, "cannot record the config file's text in data_dir");
        }
    }

    /// Publishes a pending text (retried by the poll loop after a failure). Versions are
    /// taken in order; the one published counts as applied only while its text is the
    /// one in force.
    async fn flush(&self) {
        let _one = self.flushing.lock().await;
        let Some(text) = self.state.lock().expect("share state").pending.clone() else {
            return;
        };
        if text.len() > MAX_TEXT {
            // It can never be published: applied here only, and adoption not held up.
            self.failures.inc();
            tracing::error!("config over {MAX_TEXT} bytes: applied here, not shared");
            let mut s = self.state.lock().expect("share state");
            if s.pending.as_deref() == Some(text.as_str()) {
                s.pending = None;
            }
            return;
        }
        match self.publish(&text).await {
            Ok(v) => {
                let data_dir = {
                    let mut s = self.state.lock().expect("share state");
                    if s.pending.as_deref() == Some(text.as_str()) {
                        s.pending = None;
                    }
                    if s.text.as_deref() == Some(text.as_str()) {
                        s.applied = s.applied.max(v);
                    }
                    (s.local.text == text).then(|| s.local.data_dir.clone())
                };
                // Only this replica's own file text is its record.
                if let Some(d) = data_dir {
                    self.remember(&d, &text);
                }
            }
            Err(e) => {
                self.failures.inc();
                tracing::warn!(error = %e, "config not published; retrying");
            }
        }
    }

    /// Applies a shared version: parsed against this replica's file path, this replica's
    /// own settings kept, then the same checks and transaction as a reload. It gives way
    /// to a local edit that is not yet published or that was applied meanwhile (that edit
    /// becomes the newer version).
    async fn adopt(&self, app: &App, shared: Shared) {
        let (local, gen) = {
            let s = self.state.lock().expect("share state");
            if s.pending.is_some() || s.applied >= shared.version {
                return;
            }
            (s.local.clone(), s.local_gen)
        };
        let refuse = |e: String| {
            self.failures.inc();
            tracing::error!(version = shared.version, by = %shared.by, error = %e, "shared config refused; keeping the running one");
            self.state.lock().expect("share state").refused =
                Some((shared.version, Instant::now()));
        };
        let parsed = match Config::parse(&local.source, &shared.text) {
            Ok(c) => overlay(&local, c),
            Err(e) => return refuse(e.to_string()),
        };
        // Checked under the reload lock: no local edit since the snapshot, none waiting to
        // be published, and nothing as new applied meanwhile (a publication of ours).
        let still = || {
            let mut s = self.state.lock().expect("share state");
            let go = s.local_gen == gen && s.pending.is_none() && s.applied < shared.version;
            if go {
                s.adopting = Some(shared.text.clone());
            }
            go
        };
        let r = app
            .reload_with(parsed, &format!("shared config v{}", shared.version), still)
            .await;
        self.state.lock().expect("share state").adopting = None;
        match r {
            Ok(true) => {
                self.adoptions.inc();
                let mut s = self.state.lock().expect("share state");
                s.applied = s.applied.max(shared.version);
                s.refused = None;
                tracing::info!(version = shared.version, by = %shared.by, "shared config applied");
            }
            Ok(false) => {
                tracing::info!(
                    version = shared.version,
                    "shared config not applied: a local edit came first and is published instead"
                )
            }
            Err(e) => refuse(e),
        }
    }

    /// At start (after the local config is running), then each second until `stop`.
    pub async fn run(self: Arc<Self>, app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut started = false;
        loop {
            if !started {
                started = self.start(&app).await;
            } else {
                self.flush().await;
                self.poll(&app).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
        }
    }

    /// The first exchange with Redis: the start rule, unless a local reload already
    /// happened (while Redis did not answer), which is simply published. False: Redis
    /// did not answer; tried again.
    async fn start(&self, app: &App) -> bool {
        let shared = match self.read().await {
            Ok(s) => s,
            Err(e) => {
                self.failures.inc();
                tracing::warn!(error = %e, "shared config not read; running the file's until Redis answers");
                return false;
            }
        };
        let (pending, local) = {
            let s = self.state.lock().expect("share state");
            (s.pending.is_some(), s.local.clone())
        };
        if pending {
            self.flush().await;
            return true;
        }
        let seen = std::fs::read_to_string(local.data_dir.join(SEEN_FILE)).ok();
        let rule = at_start(
            &local.text,
            seen.as_deref(),
            file_mtime_ms(&local.source),
            shared.as_ref(),
        );
        match (rule, shared) {
            (AtStart::InSync, Some(sh)) => {
                {
                    let mut s = self.state.lock().expect("share state");
                    s.text = Some(local.text.clone());
                    s.applied = sh.version;
                }
                self.remember(&local.data_dir, &local.text);
            }
            (AtStart::Adopt, Some(sh)) => {
                self.remember(&local.data_dir, &local.text);
                self.adopt(app, sh).await
            }
            _ => {
                {
                    let mut s = self.state.lock().expect("share state");
                    s.text = Some(local.text.clone());
                    s.pending = Some(local.text.clone());
                }
                self.flush().await;
            }
        }
        true
    }

    /// A newer version than the one in force is applied (one refused here is tried again
    /// after `REFUSED_RETRY`).
    async fn poll(&self, app: &App) {
        let v = match self.version().await {
            Ok(v) => v,
            Err(e) => {
                self.failures.inc();
                tracing::debug!(error = %e, "shared config version not read");
                return;
            }
        };
        let (applied, refused) = {
            let mut s = self.state.lock().expect("share state");
            if v < s.applied {
                // The version went back: Redis lost the doc (a restart without
                // persistence, a flush). Start over: what runs here is published again
                // if nothing is there, and newer versions are taken from 1.
                tracing::warn!(
                    version = v,
                    applied = s.applied,
                    "shared config version went back in Redis; starting over"
                );
                s.applied = 0;
                s.refused = None;
                if v == 0 && s.pending.is_none() {
                    s.pending = s.text.clone();
                }
            }
            (s.applied, s.refused)
        };
        let waiting = refused.is_some_and(|(r, at)| r == v && at.elapsed() < REFUSED_RETRY);
        if v <= applied || waiting {
            return;
        }
        match self.read().await {
            Ok(Some(shared)) if shared.version > applied => {
                let same = self.state.lock().expect("share state").text.as_deref()
                    == Some(shared.text.as_str());
                if same {
                    self.state.lock().expect("share state").applied = shared.version;
                } else {
                    self.adopt(app, shared).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.failures.inc();
                tracing::warn!(error = %e, "shared config not read");
            }
        }
    }

    pub fn api(&self) -> serde_json::Value {
        let s = self.state.lock().expect("share state");
        serde_json::json!({
            "version": s.applied,
            "pending_publish": s.pending.is_some(),
            "refused_version": s.refused.map(|(v, _)| v),
        })
    }

    pub fn collect(&self, e: &mut Exposition) {
        e.gauge(
            "shoal_cluster_config_version",
            "Version of the shared config in force on this replica (0: none yet).",
            &[],
            self.state.lock().expect("share state").applied as f64,
        );
        for (op, c) in [
            ("published", &self.publishes),
            ("applied", &self.adoptions),
            ("failed", &self.failures),
        ] {
            e.counter(
                "shoal_cluster_config_events_total",
                "Shared config: versions published from this replica's file, versions applied from others, failures (Redis calls, refused versions).",
                &[("event", op)],
                c.get(),
            );
        }
    }
}

impl shoal_proxy::app::Collector for ConfigShare {
    fn collect(&self, e: &mut Exposition) {
        ConfigShare::collect(self, e)
    }
}

impl shoal_proxy::app::ApiExtension for ConfigShare {
    fn get(&self, path: &str) -> Option<serde_json::Value> {
        (path == "/api/cluster/config").then(|| self.api())
    }
}

/// The file (in `data_dir`) that keeps the config file's text as the cluster last had it.
const SEEN_FILE: &str = "cluster-config.seen";

fn file_mtime_ms(path: &Path) -> Option<u64> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(m.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(text: &str, at_ms: u64) -> Shared {
        Shared {
            version: 3,
            text: text.into(),
            at_ms,
            by: "r1".into(),
        }
    }

    #[test]
    fn an_edit_is_published_at_start_and_an_old_file_adopts() {
        let b = shared("b", 9);
        assert_eq!(at_start("a", None, Some(5), None), AtStart::Publish);
        let a = shared("a", 9);
        assert_eq!(at_start("a", Some("a"), Some(5), Some(&a)), AtStart::InSync);
        // Unchanged since this replica last read it: the cluster's version wins, however
        // new the file's modification time (a deploy tool rewrote it).
        assert_eq!(at_start("a", Some("a"), Some(50), Some(&b)), AtStart::Adopt);
        // Edited since: published.
        assert_eq!(
            at_start("a2", Some("a"), Some(5), Some(&b)),
            AtStart::Publish
        );
        // A new replica: its file is an edit only if modified after the publication.
        assert_eq!(at_start("a", None, Some(5), Some(&b)), AtStart::Adopt);
        assert_eq!(at_start("a", None, Some(10), Some(&b)), AtStart::Publish);
        assert_eq!(at_start("a", None, None, Some(&b)), AtStart::Adopt);
    }

    #[test]
    fn a_replicas_own_settings_survive_the_shared_config() {
        let p = Path::new("/etc/shoal/shoal.toml");
        let local = Config::parse(
            p,
            "threads = 2\n[admin]\nlisten = \"127.0.0.1:9901\"\n[cluster]\nredis = \"redis://h:1\"\nid = \"r2\"\n\
             [services.web]\nlisten = \"127.0.0.1:8081\"\nbackends = [\"127.0.0.1:9000\"]\n",
        )
        .unwrap();
        let other = Config::parse(
            Path::new("/elsewhere/x.toml"),
            "[admin]\nlisten = \"127.0.0.1:9900\"\n[cluster]\nredis = \"redis://h:1\"\nid = \"r1\"\n\
             [services.web]\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\n\
             [services.api]\nlisten = \"127.0.0.1:8090\"\nbackends = [\"127.0.0.1:9100\"]\n",
        )
        .unwrap();
        let c = overlay(&local, other);
        assert_eq!(c.source, p);
        assert_eq!(c.threads, Some(2));
        assert_eq!(c.admin.listen.port(), 9901);
        assert_eq!(c.cluster.unwrap()["id"].as_str(), Some("r2"));
        let web = c.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.listen.unwrap().port(), 8081);
        assert_eq!(web.backends.len(), 2, "the shared backends apply");
        let api = c.services.iter().find(|s| s.name == "api").unwrap();
        assert_eq!(
            api.listen.unwrap().port(),
            8090,
            "a new service comes as written"
        );
    }
}
