//! One config for every replica (`[cluster] redis`, `share_config = true` by default).
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
//! At start a replica adopts the shared version, unless its file was modified after that
//! version was published (then the file is the newer edit and is published). A SIGHUP on a
//! replica whose file did not change since it last read it (e.g. to reload certificates)
//! does not put its file over the shared config.
//!
//! Redis is trusted with the config as it is with the fleet: whoever can write the key can
//! change every replica's routes and fleet commands. A Redis outage leaves each replica on
//! the config it has; a publication that failed is retried.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Nothing shared yet, or the file changed after the shared version: publish the file.
    Publish,
    /// Apply the shared version.
    Adopt,
    /// The file is the shared version.
    InSync,
}

/// The start rule (pure): the newest edit wins.
pub fn at_start(local_text: &str, file_mtime_ms: Option<u64>, shared: Option<&Shared>) -> AtStart {
    match shared {
        None => AtStart::Publish,
        Some(s) if s.text == local_text => AtStart::InSync,
        Some(s) if file_mtime_ms.is_some_and(|m| m > s.at_ms) => AtStart::Publish,
        Some(_) => AtStart::Adopt,
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

#[derive(Default)]
struct State {
    /// The version in force here (0: none).
    applied: u64,
    /// Text of the version in force (the shared one, or the file's when published).
    text: Option<String>,
    /// The file's text as last read, so an unchanged file is not re-published.
    file_text: String,
    /// A publication that failed, to retry.
    pending: Option<String>,
    /// A version refused here (invalid on this replica): not retried every second.
    refused: u64,
}

pub struct ConfigShare {
    redis: crate::redis_call::LazyRedis,
    id: String,
    state: Mutex<State>,
    publishes: Counter,
    adoptions: Counter,
    failures: Counter,
}

impl ConfigShare {
    pub fn new(redis: &str, id: &str, file_text: &str) -> Result<Arc<ConfigShare>, String> {
        Ok(Arc::new(ConfigShare {
            redis: crate::redis_call::LazyRedis::open(redis)?,
            id: id.to_string(),
            state: Mutex::new(State {
                file_text: file_text.to_string(),
                ..State::default()
            }),
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
        let mut s = self.state.lock().expect("share state");
        s.applied = s.applied.max(v);
        tracing::info!(version = v, "config published to the other replicas");
        Ok(v)
    }

    /// The reload gate: a file that did not change since it was last read is not applied
    /// over the shared config in force.
    pub fn file_read(&self, text: &str) -> bool {
        let mut s = self.state.lock().expect("share state");
        let changed = s.file_text != text;
        s.file_text = text.to_string();
        changed || s.text.is_none()
    }

    /// After a reload applied `config`: publishes it when it came from this replica's file.
    pub fn reloaded(self: &Arc<Self>, config: &Config) {
        let mut s = self.state.lock().expect("share state");
        if s.text.as_deref() == Some(config.text.as_str()) {
            return;
        }
        s.text = Some(config.text.clone());
        s.pending = Some(config.text.clone());
        drop(s);
        let me = self.clone();
        tokio::spawn(async move { me.flush().await });
    }

    /// Publishes a pending text (retried by the poll loop after a failure).
    async fn flush(&self) {
        let Some(text) = self.state.lock().expect("share state").pending.clone() else {
            return;
        };
        match self.publish(&text).await {
            Ok(_) => {
                let mut s = self.state.lock().expect("share state");
                if s.pending.as_deref() == Some(text.as_str()) {
                    s.pending = None;
                }
            }
            Err(e) => {
                self.failures.inc();
                tracing::warn!(error = %e, "config not published; retrying");
            }
        }
    }

    /// Applies a shared version: parsed against this replica's file path, this replica's
    /// own settings kept, then the same checks and transaction as a reload.
    async fn adopt(&self, app: &App, local: &Config, shared: Shared) {
        let refuse = |e: String| {
            self.failures.inc();
            tracing::error!(version = shared.version, by = %shared.by, error = %e, "shared config refused; keeping the running one");
            self.state.lock().expect("share state").refused = shared.version;
        };
        let parsed = match Config::parse(&local.source, &shared.text) {
            Ok(c) => overlay(local, c),
            Err(e) => return refuse(e.to_string()),
        };
        // Set first: the reload hook sees the shared text and does not publish it back.
        let previous = {
            let mut s = self.state.lock().expect("share state");
            s.text.replace(shared.text.clone())
        };
        match app
            .reload_with(parsed, &format!("shared config v{}", shared.version))
            .await
        {
            Ok(()) => {
                self.adoptions.inc();
                let mut s = self.state.lock().expect("share state");
                s.applied = s.applied.max(shared.version);
                tracing::info!(version = shared.version, by = %shared.by, "shared config applied");
            }
            Err(e) => {
                self.state.lock().expect("share state").text = previous;
                refuse(e)
            }
        }
    }

    /// At start (after the local config is running), then each second until `stop`.
    pub async fn run(
        self: Arc<Self>,
        app: Arc<App>,
        local: Config,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mtime = file_mtime_ms(&local.source);
        let mut started = false;
        loop {
            if !started {
                match self.read().await {
                    Ok(shared) => {
                        started = true;
                        match at_start(&local.text, mtime, shared.as_ref()) {
                            AtStart::Publish => {
                                let mut s = self.state.lock().expect("share state");
                                s.text = Some(local.text.clone());
                                s.pending = Some(local.text.clone());
                            }
                            AtStart::InSync => {
                                let v = shared.map_or(0, |s| s.version);
                                let mut s = self.state.lock().expect("share state");
                                s.text = Some(local.text.clone());
                                s.applied = v;
                            }
                            AtStart::Adopt => {
                                let shared = shared.expect("adopt has a version");
                                self.adopt(&app, &local, shared).await;
                            }
                        }
                    }
                    Err(e) => {
                        self.failures.inc();
                        tracing::warn!(error = %e, "shared config not read; running the file's until Redis answers");
                    }
                }
            } else {
                self.flush().await;
                match self.version().await {
                    Ok(v) => {
                        let (applied, refused) = {
                            let s = self.state.lock().expect("share state");
                            (s.applied, s.refused)
                        };
                        if v > applied && v != refused {
                            match self.read().await {
                                Ok(Some(shared)) if shared.version > applied => {
                                    let same =
                                        self.state.lock().expect("share state").text.as_deref()
                                            == Some(shared.text.as_str());
                                    if same {
                                        self.state.lock().expect("share state").applied =
                                            shared.version;
                                    } else {
                                        self.adopt(&app, &local, shared).await;
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    self.failures.inc();
                                    tracing::warn!(error = %e, "shared config not read");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        self.failures.inc();
                        tracing::debug!(error = %e, "shared config version not read");
                    }
                }
            }
            if started {
                self.flush().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shoal_proxy::server::stopped(&mut stop) => break,
            }
        }
    }

    pub fn api(&self) -> serde_json::Value {
        let s = self.state.lock().expect("share state");
        serde_json::json!({
            "version": s.applied,
            "pending_publish": s.pending.is_some(),
            "refused_version": (s.refused > 0).then_some(s.refused),
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
    fn the_newest_edit_wins_at_start() {
        assert_eq!(at_start("a", Some(5), None), AtStart::Publish);
        assert_eq!(
            at_start("a", Some(5), Some(&shared("a", 9))),
            AtStart::InSync
        );
        assert_eq!(
            at_start("a", Some(5), Some(&shared("b", 9))),
            AtStart::Adopt
        );
        assert_eq!(
            at_start("a", Some(10), Some(&shared("b", 9))),
            AtStart::Publish
        );
        assert_eq!(at_start("a", None, Some(&shared("b", 9))), AtStart::Adopt);
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
