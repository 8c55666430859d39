//! The `shoal` command: thin wiring of the workspace crates behind a clap CLI.
#![forbid(unsafe_code)]

mod plot;
mod serve;
mod simulate;
mod status;
mod tune;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_proxy::config::LogFormat;

/// shoal keeps a fleet of service instances sized to its load.
#[derive(Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// Log lines on stderr: text, or json (one object per line, fields flattened; the access
    /// log included). Default: `log_format` of the config, else text.
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // rustls warns about what clients send (an IP address as SNI) once per handshake: any
    // client could fill the log. Handshake failures are counted in shoal's metrics instead.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rustls")) {
        filter = filter.add_directive("rustls=error".parse().expect("static directive"));
    }
    // Colour only for a person at a terminal: escapes in files, pipes and journals are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // Event fields at the top level next to timestamp, level, target and message, so a
        // log shipper can index `status` or `service` without unwrapping.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// (internal) Stops a run's instances once shoal exits: EOF on stdin.
    #[command(name = "_watchdog", hide = true)]
    Watchdog { run_file: PathBuf },
    /// (internal) Joins cgroups (`--join .../cgroup.procs`), then execs the command.
    #[command(name = "_exec", hide = true)]
    Exec {
        #[arg(long = "join")]
        join: Vec<PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run everything a TOML config describes.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Data-path worker threads (overrides `threads` in the config).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Validate a config file (exit 0, or print file:line: field: problem and exit 1).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Zero-config quick mode: a load balancer in front of fixed backends.
    Proxy(serve::ProxyArgs),
    /// Replay a demand trace through the scaling policies.
    Simulate(simulate::SimulateArgs),
    /// The cheapest autoscaling settings that meet an objective on your own traffic.
    Tune(tune::TuneArgs),
    /// Recorded demand history (`shoal history export`).
    History {
        #[command(subcommand)]
        cmd: tune::HistoryCmd,
    },
    /// Services, instances, desired counts, last decisions and size recommendations.
    Status {
        /// The admin listener to ask.
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every SECONDS (default 1) until interrupted, with per-instance req/s.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1", conflicts_with = "json")]
        watch: Option<f64>,
    },
    /// Open-loop load generator: constant arrival rate, latency from the intended send time.
    Load {
        /// Target URL (http://).
        url: String,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// Seconds to run.
        #[arg(long)]
        duration: f64,
        /// Most keep-alive connections to open.
        #[arg(long)]
        connections: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bundled demo service (the instances the demo fleet runs); reads PORT.
    #[command(name = "demo-service")]
    DemoService {
        /// Listen address; default 127.0.0.1:$PORT.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
}

fn run_load(
    url: &str,
    rate: f64,
    duration: f64,
    connections: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        duration.is_finite() && duration > 0.0,
        "--duration must be a positive number of seconds"
    );
    let uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid URL {url:?}: {e}"))?;
    let mut cfg =
        shoal_tools::LoadConfig::new(uri, rate, std::time::Duration::from_secs_f64(duration));
    if let Some(c) = connections {
        cfg.connections = c;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(shoal_tools::run_load(
        cfg,
        shoal_tools::load::progress_default(),
    ))?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (aws-lc-rs).
    shoal_proxy::tls::provider();
    // The config's `log_format` counts for `run`; a config that does not load is reported
    // by the run itself.
    let format = cli.log_format.unwrap_or_else(|| match &cli.command {
        Command::Run { config, .. } => shoal_proxy::Config::load(config)
            .ok()
            .and_then(|c| c.log_format)
            .unwrap_or_default(),
        _ => LogFormat::default(),
    });
    init_logging(format);
    let result = match cli.command {
        Command::Watchdog { run_file } => {
            shoal_fleet::supervise::watchdog_main(&run_file).map_err(anyhow::Error::from)
        }
        Command::Exec { join, command } => {
            let e = shoal_fleet::supervise::exec_main(&join, &command[0], &command[1..]);
            Err(anyhow::anyhow!("cannot run {}: {e}", command[0]))
        }
        Command::Run { config, threads } => serve::run_config(&config, threads),
        Command::Check { config } => match serve::load_config(&config) {
            Ok(c) => {
                println!("{}: ok ({} service(s))", config.display(), c.services.len());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e:#}");
                return ExitCode::from(1);
            }
        },
        Command::Status { admin, json, watch } => status::run(admin, json, watch),
        Command::Simulate(args) => simulate::run(args),
        Command::Tune(args) => tune::run(args),
        Command::History { cmd } => tune::run_history(cmd),
        Command::Proxy(args) => serve::run_quick(args),
        Command::DemoService { listen } => serve::run_demo(listen),
        Command::Load {
            url,
            rate,
            duration,
            connections,
            json,
        } => run_load(&url, rate, duration, connections, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match format {
                // Every stderr line stays one JSON object.
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "shoal failed"),
                LogFormat::Text => eprintln!("shoal: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}
