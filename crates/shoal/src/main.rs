//! The `shoal` command: thin wiring of the workspace crates behind a clap CLI.
#![forbid(unsafe_code)]

mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// shoal keeps a fleet of service instances sized to its load.
#[derive(Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Bundled demo service (the instances the demo fleet runs); reads PORT.
    #[command(name = "demo-service")]
    DemoService {
        /// Listen address; default 127.0.0.1:$PORT.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run { config, threads } => serve::run_config(&config, threads),
        Command::Check { config } => match shoal_proxy::Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} service(s))", config.display(), c.services.len());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        Command::Proxy(args) => serve::run_quick(args),
        Command::DemoService { listen } => serve::run_demo(listen),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::from(1)
        }
    }
}
