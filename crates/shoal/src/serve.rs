//! Running the proxy: runtime set-up, admin listener, signals (SIGTERM/SIGINT drain and
//! exit, SIGHUP reload).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use shoal_balance::Algorithm;
use shoal_proxy::config::{parse_duration, BackendSpec, HealthConfig, ServiceConfig};
use shoal_proxy::{App, Config};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// `shoal proxy`: the zero-config quick mode.
#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Client-facing listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A backend address; repeat for several. `ADDR` or `ADDR=WEIGHT`.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// round-robin, weighted-round-robin, least-connections, ip-hash, consistent-hash, random, p2c-ewma
    #[arg(long, default_value = "round-robin")]
    balance: Algorithm,
    /// Admin listener (metrics, API, dashboard).
    #[arg(long, default_value = "127.0.0.1:9900")]
    admin: SocketAddr,
    /// Bearer token for mutating admin endpoints (or SHOAL_ADMIN_TOKEN).
    #[arg(long, env = "SHOAL_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Data-path worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Enable active health checks on this path (e.g. /healthz).
    #[arg(long)]
    health_path: Option<String>,
    /// Ramp new and recovered instances over this window, e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    slow_start: Option<Duration>,
    /// Cache responses (RFC 9111) in a memory tier of this size, e.g. 64MiB.
    #[arg(long, value_parser = parse_cache_size)]
    cache_memory: Option<u64>,
    /// Share the cache through Redis, e.g. redis://127.0.0.1:6379/ (needs --cache-memory).
    #[arg(long, requires = "cache_memory")]
    cache_redis: Option<String>,
    /// Terminate TLS with this certificate chain (PEM); repeat with --tls-key for more
    /// names (chosen by SNI). The first pair is the default certificate.
    #[arg(long = "tls-cert", requires = "tls_keys")]
    tls_certs: Vec<std::path::PathBuf>,
    /// The private key (PEM) of the --tls-cert at the same position.
    #[arg(long = "tls-key", requires = "tls_certs")]
    tls_keys: Vec<std::path::PathBuf>,
    /// How often the certificate files are checked for changes (0 disables; SIGHUP and
    /// POST /api/tls/reload always reload).
    #[arg(long, value_parser = parse_duration)]
    tls_watch: Option<Duration>,
    /// The protocol spoken to the backends: http1, or h2c (HTTP/2 without TLS, as gRPC
    /// servers speak it).
    #[arg(long, default_value = "http1", value_parser = parse_upstream_protocol)]
    upstream_protocol: shoal_proxy::config::Protocol,
}

fn parse_upstream_protocol(s: &str) -> Result<shoal_proxy::config::Protocol, String> {
    match shoal_proxy::config::Protocol::parse(s)? {
        p @ (shoal_proxy::config::Protocol::Http1 | shoal_proxy::config::Protocol::H2c) => Ok(p),
        _ => Err("quick mode speaks http1 or h2c to backends (h2 and auto need upstream_tls in a config file)".into()),
    }
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    shoal_proxy::config::parse_size(s)
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    // One thread: a current-thread runtime, no work-stealing overhead (like one HAProxy thread).
    let rt = if n == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

pub fn run_quick(args: ProxyArgs) -> anyhow::Result<()> {
    let mut svc = ServiceConfig::quick("default", args.listen, args.balance);
    for b in &args.backends {
        let (addr, weight) = match b.split_once('=') {
            Some((a, w)) => (
                a,
                w.parse::<u32>()
                    .with_context(|| format!("invalid weight in --backend {b}"))?,
            ),
            None => (b.as_str(), 1),
        };
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("invalid --backend address {addr:?}"))?;
        svc.backends.push(BackendSpec { addr, weight });
    }
    if let Some(p) = args.health_path {
        svc.health = Some(HealthConfig {
            path: p,
            ..HealthConfig::default()
        });
    }
    if let Some(s) = args.slow_start {
        svc.slow_start = s;
    }
    if args.cache_memory.is_some() {
        svc.cache = Some(shoal_proxy::shoal_cache::CacheConfig::default());
    }
    svc.protocol = args.upstream_protocol;
    anyhow::ensure!(
        args.tls_certs.len() == args.tls_keys.len(),
        "--tls-cert and --tls-key come in pairs ({} certs, {} keys)",
        args.tls_certs.len(),
        args.tls_keys.len()
    );
    if !args.tls_certs.is_empty() {
        let raw = shoal_proxy::tls::RawTls {
            cert: None,
            key: None,
            certs: (args.tls_certs.iter().zip(&args.tls_keys))
                .map(|(c, k)| shoal_proxy::tls::CertFiles {
                    cert: c.clone(),
                    key: k.clone(),
                })
                .collect(),
            client_ca: None,
            client_auth: None,
            identity_header: None,
            watch: args.tls_watch.map(shoal_proxy::config::Dur),
            hsts: None,
        };
        let tls = raw
            .validate(Path::new("."))
            .map_err(|(field, e)| anyhow::anyhow!("--tls-{field}: {e}"))?;
        svc.tls = Some(tls);
    }
    let rt = runtime(args.threads)?;
    rt.block_on(async move {
        let app = App::new(None, args.admin_token);
        if let Some(bytes) = args.cache_memory {
            use shoal_proxy::shoal_cache::{CacheStore, PolicyConfig, RedisConfig};
            let redis = args.cache_redis.map(RedisConfig::new);
            app.set_cache_store(CacheStore::new(bytes, redis, &PolicyConfig::default())?);
        }
        app.start_service(svc).await?;
        serve_until_signal(app, args.admin, Duration::from_secs(30)).await?;
        Ok(())
    })
}

/// Loads a config and validates every part of it (proxy and fleets).
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    shoal_fleet::fleet_specs(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    shoal_fleet::cluster::cluster_spec(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    shoal_queue::runtime::validate(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config)
}

pub fn run_config(path: &Path, threads: Option<usize>) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let rt = runtime(threads.or(config.threads))?;
    let token = std::env::var("SHOAL_ADMIN_TOKEN")
        .ok()
        .or_else(|| config.admin.token.clone());
    rt.block_on(async move {
        let app = App::new(Some(path.to_path_buf()), token);
        // A reload must pass the same checks as a start, fleet tables included.
        app.set_validator(Box::new(|c| {
            shoal_fleet::fleet_specs(c).map_err(|e| e.to_string())?;
            shoal_fleet::cluster::cluster_spec(c).map_err(|e| e.to_string())?;
            shoal_queue::runtime::validate(c)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
        // Async routes hand their requests to the queues: installed before services start.
        let queues = shoal_queue::Queues::start(&config)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        app.set_jobs(queues.clone());
        app.add_collector(queues.clone());
        app.add_extension(queues.clone());
        app.start(&config).await?;
        // Instances join their cgroups through `shoal _exec`; a watchdog stops them if
        // shoal dies.
        shoal_fleet::supervise::enable_helpers();
        let fleets = shoal_fleet::Fleets::start_with(&app, &config, &queues.fleet_hooks())
            .map_err(|e| anyhow::anyhow!(e))?;
        // Replicas sharing a Redis (`[cluster] redis`) share one config (`config_share.rs`)
        // and TLS session-ticket keys (`ticket_share.rs`). On a Lease each keeps its own.
        let (share_stop, share_rx) = watch::channel(false);
        let cluster =
            shoal_fleet::cluster::cluster_spec(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let redis = cluster
            .as_ref()
            .and_then(|c| c.redis.clone().map(|r| (c, r)));
        if let Some((_, url)) = redis
            .as_ref()
            .filter(|_| config.services.iter().any(|s| s.tls.is_some()))
        {
            let t =
                shoal_fleet::ticket_share::TicketShare::new(url, shoal_proxy::tickets::shared())
                    .map_err(|e| anyhow::anyhow!("cluster: {e}"))?;
            app.add_collector(t.clone());
            tokio::spawn(t.run(share_rx.clone()));
        }
        let share = match redis {
            Some((c, url)) if c.share_config => {
                let s = shoal_fleet::config_share::ConfigShare::new(&url, &c.id, &config)
                    .map_err(|e| anyhow::anyhow!("cluster: {e}"))?;
                let gate = s.clone();
                app.set_reload_gate(Box::new(move |text| gate.file_read(text)));
                app.add_collector(s.clone());
                app.add_extension(s.clone());
                tokio::spawn(s.clone().run(app.clone(), share_rx));
                Some(s)
            }
            _ => None,
        };
        let on_reload = fleets.clone();
        app.set_on_reload(Box::new(move |c| {
            on_reload.reload(c);
            if let Some(s) = &share {
                s.reloaded(c);
            }
        }));
        let deadline = config
            .services
            .iter()
            .map(|s| s.timeouts.drain.0)
            .max()
            .unwrap_or(Duration::from_secs(30));
        let forced = serve_until_signal(app, config.admin.listen, deadline).await?;
        share_stop.send_replace(true);
        if forced {
            fleets.kill_now();
            return Ok(());
        }
        // Clients are drained; now drain and stop the instances (jobs already taken finish
        // first; unfinished ones stay on the broker). A second SIGTERM/SIGINT meanwhile
        // stops them at once (SIGKILL to each instance's group and cgroup).
        tokio::select! {
            _ = async {
                queues.shutdown(deadline).await;
                fleets.shutdown(deadline + Duration::from_secs(15)).await;
            } => {}
            _ = second_signal() => {
                tracing::warn!("second signal: stopping instances now");
                fleets.kill_now();
            }
        }
        Ok(())
    })
}

pub fn run_demo(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = match listen {
            Some(a) => tokio::net::TcpListener::bind(a).await?,
            None => shoal_tools::bind_from_env().await?,
        };
        tracing::info!(addr = %listener.local_addr()?, "demo service listening");
        shoal_tools::run_demo(listener, shoal_tools::DemoConfig::from_env()).await?;
        Ok(())
    })
}

/// Resolves on the next SIGTERM or SIGINT.
async fn second_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Serves the admin listener and waits for signals: SIGHUP reloads, SIGTERM/SIGINT stop
/// accepting and drain in-flight requests up to `deadline`, then return. A second
/// SIGTERM/SIGINT cuts the drain short; returns whether that happened.
async fn serve_until_signal(
    app: Arc<App>,
    admin: SocketAddr,
    deadline: Duration,
) -> anyhow::Result<bool> {
    let (admin_stop, rx) = watch::channel(false);
    let admin_addr = shoal_proxy::admin::serve(admin, app.clone(), rx)
        .await
        .with_context(|| format!("cannot bind the admin listener on {admin}"))?;
    tracing::info!(%admin_addr, "admin listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if app.has_config_file() {
                    if let Err(e) = app.reload().await {
                        tracing::error!(error = %e, "reload failed");
                    }
                }
                // Certificates are re-read even when the config did not change.
                if let Err(e) = app.reload_tls() {
                    tracing::error!(error = %e, "tls reload failed");
                }
            }
        }
    }
    tracing::info!(
        deadline_s = deadline.as_secs_f64(),
        "shutting down: draining in-flight requests (signal again to stop at once)"
    );
    // A second SIGTERM/SIGINT cuts the drain short.
    let (left, forced) = tokio::select! {
        left = app.shutdown(deadline) => (left, false),
        _ = second_signal() => {
            tracing::warn!("second signal: stopping without draining");
            (0, true)
        }
    };
    let _ = admin_stop.send(true);
    tracing::info!(left, "stopped");
    Ok(forced)
}
