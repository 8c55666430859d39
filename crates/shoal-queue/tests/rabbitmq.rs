//! shoal-queue against a real RabbitMQ node started for each test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{dispatcher_config, scenarios, Rabbit, Stack, Worker};
use shoal_queue::amqp::{AmqpBroker, AmqpConfig};
use shoal_queue::dispatch::WorkerSet;
use shoal_queue::job::JobRecord;
use shoal_queue::Broker;

fn connect(
    url: String,
    queue: &'static str,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Broker>>>> {
    move || {
        let url = url.clone();
        Box::pin(async move {
            let mut cfg = AmqpConfig::new(&url, queue);
            cfg.prefetch = dispatcher_config().concurrency as u16;
            let b = AmqpBroker::start(cfg);
            assert!(
                b.wait_connected(Duration::from_secs(60)).await,
                "rabbitmq connection"
            );
            Arc::new(b) as Arc<dyn Broker>
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_end_to_end_across_restarts() {
    let r = Rabbit::start();
    let dir = tempfile::tempdir().unwrap();
    scenarios::end_to_end_across_restarts(connect(r.url(), "e2e"), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_idempotency_and_dead_letter() {
    let r = Rabbit::start();
    let dir = tempfile::tempdir().unwrap();
    scenarios::idempotency_and_dead_letter(connect(r.url(), "dl"), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_thousand_jobs_with_worker_kills() {
    let r = Rabbit::start();
    let dir = tempfile::tempdir().unwrap();
    let (dup_exec, dups, elapsed) =
        scenarios::thousand_jobs_with_kills(connect(r.url(), "k"), dir.path()).await;
    eprintln!(
        "rabbitmq: 1000 jobs, 2 workers SIGKILLed: 0 lost, {dup_exec} duplicate executions, {dups} duplicate deliveries detected, {:.1}s",
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_scales_zero_to_n_to_zero() {
    let r = Rabbit::start();
    let dir = tempfile::tempdir().unwrap();
    let trace = scenarios::scale_zero_to_n_to_zero(connect(r.url(), "s"), dir.path()).await;
    eprintln!("rabbitmq scaling trace: {trace:?}");
}

/// Broker down: submissions get 503 (none accepted and lost); jobs accepted before survive
/// the broker's restart; shoal reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_broker_outage() {
    let mut r = Rabbit::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("exec.log");
    let workers = WorkerSet::new();
    let broker = connect(r.url(), "o")().await;
    let mut s = Stack::new(
        broker.clone(),
        &dir.path().join("j.redb"),
        workers.clone(),
        dispatcher_config(),
    );
    s.start_dispatcher();
    // No worker yet: the job stays queued.
    let (st, before) = s.post("/async/work", "before", None).await;
    assert_eq!(st, 202);
    let before = before.unwrap();

    r.stop_node();
    let mut refused = 0;
    for i in 0..10 {
        let (st, _) = s.post(&format!("/async/work?down={i}"), "down", None).await;
        assert_ne!(st, 202, "a 202 while the broker is down");
        assert_eq!(st, 503);
        refused += 1;
    }
    let resp = s
        .submitter
        .handle_submit(
            http::Request::post("/async/work")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(s.metrics.rejected.get(), refused + 1);

    r.boot();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let after = loop {
        let (st, id) = s.post("/async/work", "after", None).await;
        if st == 202 {
            break id.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(broker.state().connects() >= 2, "reconnected");
    let w = Worker::start("w", &log);
    workers.add(&w.id, w.addr);
    workers.ready(&w.id);
    for id in [&before, &after] {
        assert!(matches!(
            s.wait_final(id, Duration::from_secs(60)).await,
            JobRecord::Done { .. }
        ));
    }
    s.shutdown().await;
}
