//! `shoal-kube-testapi`: a TEST DOUBLE of the Kubernetes API server (see the library docs).
//! Writes a kubeconfig for kubectl and shoal, serves until SIGINT/SIGTERM, then stops its
//! pods.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "shoal-kube-testapi",
    about = "A test double of the Kubernetes API server: enough of the API for kubectl and shoal's Kubernetes provider, with a Deployment controller that runs `shoal demo-service` pods on loopback. Not a Kubernetes implementation."
)]
struct Args {
    /// Address to serve the API on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write a kubeconfig for this server.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The shoal binary pods run (`shoal demo-service`); default: `shoal` next to this
    /// binary, else on PATH.
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 1.0)]
    bookmark_interval: f64,
    /// Seconds a deleted pod stays terminating before its process gets SIGTERM.
    #[arg(long, default_value_t = 1.5)]
    termination_delay: f64,
    /// Serve no `metrics.k8s.io` (a cluster without metrics-server).
    #[arg(long)]
    no_metrics_api: bool,
    /// Serve no pods `resize` subresource (a cluster without in-place pod resize).
    #[arg(long)]
    no_pod_resize: bool,
}

fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let shoal = args.shoal.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("shoal")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("shoal"))
    });
    let mut opts = shoal_kube_testapi::Options::new(args.listen, shoal);
    opts.kubeconfig = args.kubeconfig;
    opts.bookmark_interval = Duration::from_secs_f64(args.bookmark_interval.max(0.05));
    opts.termination_delay = Duration::from_secs_f64(args.termination_delay.max(0.0));
    opts.metrics_api = !args.no_metrics_api;
    opts.pod_resize = !args.no_pod_resize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let api = shoal_kube_testapi::TestApi::start(opts).await?;
        tracing::info!(addr = %api.addr, "test apiserver listening (a test double, not Kubernetes)");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        api.shutdown().await;
        Ok(())
    })
}
