//! Throughput of jobs end to end through a real broker, run by `bench/queue.sh`
//! (ignored in the normal test run: it measures, it does not check).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Rabbit, Stack, Tansu, Worker};
use shoal_queue::amqp::{AmqpBroker, AmqpConfig};
use shoal_queue::dispatch::{DispatcherConfig, WorkerSet};
use shoal_queue::job::JobRecord;
use shoal_queue::kafka::{KafkaBroker, KafkaConfig};
use shoal_queue::Broker;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn run(broker: Arc<dyn Broker>, label: &str) {
    let jobs = env("JOBS", 5000);
    let nworkers = env("WORKERS", 2);
    let concurrency = env("CONCURRENCY", 64);
    let submitters = env("SUBMITTERS", 32);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("exec.log");
    let workers = WorkerSet::new();
    let procs: Vec<Worker> = (0..nworkers)
        .map(|i| Worker::start(&format!("w{i}"), &log))
        .collect();
    for w in &procs {
        workers.add(&w.id, w.addr);
        workers.ready(&w.id);
    }
    let cfg = DispatcherConfig {
        concurrency,
        ..Default::default()
    };
    let mut s = Stack::new(broker, &dir.path().join("j.redb"), workers, cfg);
    s.start_dispatcher();
    let t0 = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..submitters {
        let sub = s.submitter.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut ids = vec![];
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                let req = http::Request::post("/async/work")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                    .unwrap();
                let r = sub.handle_submit(req).await;
                assert_eq!(r.status(), 202);
                ids.push(r.headers()["location"].to_str().unwrap()[6..].to_string());
            }
            ids
        });
    }
    let mut ids = vec![];
    while let Some(r) = tasks.join_next().await {
        ids.extend(r.unwrap());
    }
    let submit_secs = t0.elapsed().as_secs_f64();
    let mut lat = vec![];
    for id in &ids {
        match s.wait_final(id, Duration::from_secs(600)).await {
            JobRecord::Done {
                submitted_ms,
                finished_ms,
                ..
            } => lat.push(finished_ms - submitted_ms),
            other => panic!("{other:?}"),
        }
    }
    let total = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{label}: {jobs} jobs, {nworkers} workers, concurrency {concurrency}: submitted {:.0}/s, end to end {:.0} jobs/s ({total:.1}s), latency p50 {} ms p99 {} ms max {} ms",
        jobs as f64 / submit_secs,
        jobs as f64 / total,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().unwrap()
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: bench/queue.sh"]
async fn bench_rabbitmq() {
    let r = Rabbit::start();
    let mut cfg = AmqpConfig::new(&r.url(), "bench");
    cfg.prefetch = env("CONCURRENCY", 64) as u16;
    let b = AmqpBroker::start(cfg);
    assert!(b.wait_connected(Duration::from_secs(60)).await);
    run(Arc::new(b), "rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: bench/queue.sh"]
async fn bench_kafka() {
    let t = Tansu::start();
    let mut cfg = KafkaConfig::new(&t.addr(), "bench", "bench");
    cfg.session_timeout = Duration::from_secs(2);
    run(Arc::new(KafkaBroker::start(cfg).await.unwrap()), "kafka").await;
}
