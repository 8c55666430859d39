//! Minimal Pingora load balancer, the peer for shoal in `bench/proxy.sh`.
//!
//! It is the load balancer of Pingora's quick start (`docs/quick_start.md`,
//! `pingora-proxy/examples/load_balancer.rs`) with plain HTTP to the backends: a
//! `LoadBalancer<RoundRobin>` over the backends given on the command line, `upstream_peer`
//! returning an `HttpPeer` without TLS, and Pingora's default upstream connection pool
//! (keep-alive to the backends). One worker thread, no daemon, no logger (quiet), the
//! request's Host header is forwarded as is.
//!
//! Usage: pingora-lb LISTEN_ADDR BACKEND_ADDR...

use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

pub struct LB(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for LB {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let upstream = self
            .0
            .select(b"", 256) // the key does not matter for round robin
            .ok_or_else(|| Error::explain(HTTPStatus(502), "no backend"))?;
        Ok(Box::new(HttpPeer::new(upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: pingora-lb LISTEN_ADDR BACKEND_ADDR...");
        std::process::exit(2);
    }
    let (listen, backends) = (&args[0], &args[1..]);

    let conf = ServerConf {
        threads: 1,
        daemon: false,
        // Exit promptly on SIGTERM instead of the default 5-minute grace period.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let upstreams = LoadBalancer::try_from_iter(backends.iter().map(String::as_str))
        .expect("backend addresses");
    let mut lb = http_proxy_service(&server.configuration, LB(Arc::new(upstreams)));
    lb.add_tcp(listen);
    server.add_service(lb);
    server.run_forever();
}
