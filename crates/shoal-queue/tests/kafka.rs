//! shoal-queue against a real Kafka-protocol broker (tansu) started for each test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{dispatcher_config, scenarios, Stack, Tansu};
use shoal_queue::dispatch::WorkerSet;
use shoal_queue::kafka::{KafkaBroker, KafkaConfig};
use shoal_queue::Broker;

fn connect(
    addr: String,
    topic: &'static str,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Broker>>>> {
    move || {
        let addr = addr.clone();
        Box::pin(async move {
            let mut cfg = KafkaConfig::new(&addr, topic, "shoal-workers");
            cfg.session_timeout = Duration::from_secs(2);
            cfg.confirm_timeout = Duration::from_secs(3);
            let b = KafkaBroker::start(cfg).await.expect("kafka clients");
            Arc::new(b) as Arc<dyn Broker>
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_end_to_end_across_restarts() {
    let t = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    scenarios::end_to_end_across_restarts(connect(t.addr(), "e2e"), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_idempotency_and_dead_letter() {
    let t = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    scenarios::idempotency_and_dead_letter(connect(t.addr(), "dl"), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_thousand_jobs_with_worker_kills() {
    let t = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let (dup_exec, dups, elapsed) =
        scenarios::thousand_jobs_with_kills(connect(t.addr(), "k"), dir.path()).await;
    eprintln!(
        "kafka: 1000 jobs, 2 workers SIGKILLed: 0 lost, {dup_exec} duplicate executions, {dups} duplicate deliveries detected, {:.1}s",
        elapsed.as_secs_f64()
    );
}

/// The backlog at zero workers (nothing consumes, nobody in the group) is exact, also after
/// the producer sent multi-record batches (for which tansu's ListOffsets answers too low),
/// and it falls as jobs are taken and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_backlog_is_exact_with_no_consumer() {
    let t = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let broker = connect(t.addr(), "b")().await;
    let s = Stack::new(
        broker.clone(),
        &dir.path().join("j.redb"),
        WorkerSet::new(),
        dispatcher_config(),
    );
    // Concurrent submissions: the idempotent producer batches them.
    let posts = (0..60).map(|i| {
        let s = &s;
        async move { s.post(&format!("/async/work?i={i}"), "x", None).await.0 }
    });
    let statuses = futures_util::future::join_all(posts).await;
    assert!(statuses.iter().all(|&st| st == 202), "{statuses:?}");
    let exact = |want: u64| {
        let broker = broker.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let got = broker.backlog().await;
                if matches!(got, Ok(n) if n == want) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "backlog {got:?}, want {want}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    exact(60).await;
    // Take ten and settle them: the committed offsets move, the backlog follows.
    for _ in 0..10 {
        let d = broker.next().await.unwrap();
        d.settle.ack().await.unwrap();
    }
    exact(50).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_scales_zero_to_n_to_zero() {
    let t = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let trace = scenarios::scale_zero_to_n_to_zero(connect(t.addr(), "s"), dir.path()).await;
    eprintln!("kafka scaling trace: {trace:?}");
}

/// Broker down: submissions get 503, never a 202 that may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_down_refuses() {
    let mut t = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let broker = connect(t.addr(), "o")().await;
    let s = Stack::new(
        broker,
        &dir.path().join("j.redb"),
        WorkerSet::new(),
        dispatcher_config(),
    );
    let (st, _) = s.post("/async/work", "up", None).await;
    assert_eq!(st, 202);
    t.stop_node();
    for i in 0..3 {
        let (st, _) = s.post(&format!("/async/work?down={i}"), "down", None).await;
        assert_eq!(st, 503);
    }
    assert_eq!(s.metrics.rejected.get(), 3);
    s.shutdown().await;
}
