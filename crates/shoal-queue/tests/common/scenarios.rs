//! The same scenarios for every broker: `make` connects a fresh broker client each time it
//! is called (a restarted shoal).

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_queue::backlog::{BacklogInput, BacklogParams, BacklogPolicy, BacklogSampler};
use shoal_queue::dispatch::WorkerSet;
use shoal_queue::job::JobRecord;
use shoal_queue::Broker;

use super::{dispatcher_config, executions, Stack, Worker};

fn body_of(r: &JobRecord) -> String {
    match r {
        JobRecord::Done { response, .. } => String::from_utf8_lossy(&response.body).into_owned(),
        other => panic!("not done: {other:?}"),
    }
}

/// A job end to end; then a job submitted by one shoal and finished by the next, with the
/// first result still readable after both restarts.
pub async fn end_to_end_across_restarts<F, Fut>(make: F, dir: &Path)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let store = dir.join("jobs.redb");
    let log = dir.join("exec.log");
    let w = Worker::start("w1", &log);
    let workers = WorkerSet::new();
    workers.add(&w.id, w.addr);
    workers.ready(&w.id);

    let mut s1 = Stack::new(make().await, &store, workers.clone(), dispatcher_config());
    s1.start_dispatcher();
    let (status, id1) = s1.post("/async/work?n=1", "hello", None).await;
    assert_eq!(status, 202);
    let id1 = id1.expect("Location");
    let rec = s1.wait_final(&id1, Duration::from_secs(60)).await;
    let body = body_of(&rec);
    assert!(body.contains("\"body\": \"hello\""), "{body}");
    assert!(
        body.contains(&id1) && body.contains("/async/work?n=1"),
        "{body}"
    );
    let resp = s1.submitter.handle_job(&id1).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        s1.submitter
            .handle_job("0123456789abcdef0123456789abcdef")
            .await
            .status(),
        404
    );
    assert_eq!(s1.metrics.done.get(), 1);
    eprintln!("e2e: first job done");
    s1.shutdown().await;
    eprintln!("e2e: first shoal stopped");

    // Submitted while no dispatcher runs, then shoal stops.
    let s2 = Stack::new(make().await, &store, workers.clone(), dispatcher_config());
    let (status, id2) = s2.post("/async/work?n=2", "second", None).await;
    assert_eq!(status, 202);
    let id2 = id2.unwrap();
    assert_eq!(s2.submitter.handle_job(&id2).await.status(), 202, "pending");
    s2.shutdown().await;
    eprintln!("e2e: second shoal stopped");

    // The next shoal finishes it; the first result survived.
    let mut s3 = Stack::new(make().await, &store, workers.clone(), dispatcher_config());
    eprintln!("e2e: third shoal up");
    assert_eq!(
        s3.submitter.handle_job(&id2).await.status(),
        202,
        "still pending"
    );
    s3.start_dispatcher();
    let rec = s3.wait_final(&id2, Duration::from_secs(60)).await;
    assert!(body_of(&rec).contains("second"));
    assert_eq!(s3.submitter.handle_job(&id1).await.status(), 200);
    // Give a redelivered first job time to show up: it must be a counted duplicate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = executions(&log);
    assert_eq!(runs.get(&id1), Some(&1), "job 1 ran once: {runs:?}");
    assert_eq!(
        s3.metrics.done.get(),
        1,
        "only job 2 done by the third shoal"
    );
    s3.shutdown().await;
}

/// Idempotency keys, dead-lettering after the attempts, bad bodies.
pub async fn idempotency_and_dead_letter<F, Fut>(make: F, dir: &Path)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let log = dir.join("exec.log");
    let w = Worker::start("w1", &log);
    let workers = WorkerSet::new();
    workers.add(&w.id, w.addr);
    workers.ready(&w.id);
    let mut s = Stack::new(
        make().await,
        &dir.join("j.redb"),
        workers,
        dispatcher_config(),
    );
    s.start_dispatcher();

    let (st_a, a) = s.post("/async/work", "x", Some("order-17")).await;
    let (st_b, b) = s.post("/async/work", "x", Some("order-17")).await;
    let (st_c, c) = s.post("/async/work", "x", Some("order-18")).await;
    assert_eq!((st_a, st_b, st_c), (202, 202, 202));
    assert_eq!(a, b, "same key, same job");
    assert_ne!(a, c);
    assert_eq!(s.metrics.accepted.get(), 2);

    let (st, f) = s.post("/async/work?fail=1", "doomed", None).await;
    assert_eq!(st, 202);
    let f = f.unwrap();
    match s.wait_final(&f, Duration::from_secs(60)).await {
        JobRecord::Failed {
            attempts, error, ..
        } => {
            assert_eq!(attempts, dispatcher_config().max_attempts);
            assert!(error.contains("500"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.submitter.handle_job(&f).await.status(), 502);
    assert_eq!(s.metrics.dead_lettered.get(), 1);
    assert_eq!(
        executions(&log)[&f],
        dispatcher_config().max_attempts as usize
    );
    s.wait_final(a.as_deref().unwrap(), Duration::from_secs(30))
        .await;
    s.shutdown().await;
}

/// 1,000 jobs while two worker processes are SIGKILLed mid-run: every job gets a result.
/// Returns (duplicate executions seen by workers, duplicates detected by shoal, elapsed).
pub async fn thousand_jobs_with_kills<F, Fut>(make: F, dir: &Path) -> (usize, u64, Duration)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    const N: usize = 1000;
    let log = dir.join("exec.log");
    let workers = WorkerSet::new();
    let mut procs: Vec<Worker> = (0..3)
        .map(|i| Worker::start(&format!("w{i}"), &log))
        .collect();
    for w in &procs {
        workers.add(&w.id, w.addr);
        workers.ready(&w.id);
    }
    let mut s = Stack::new(
        make().await,
        &dir.join("j.redb"),
        workers.clone(),
        dispatcher_config(),
    );
    s.start_dispatcher();
    let started = Instant::now();
    let sub = s.submitter.clone();
    let submit = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(N);
        for chunk in 0..N / 50 {
            let mut batch = tokio::task::JoinSet::new();
            for i in 0..50 {
                let sub = sub.clone();
                batch.spawn(async move {
                    let req = http::Request::post(format!(
                        "/async/work?sleep_ms=20&n={}",
                        chunk * 50 + i
                    ))
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        b"payload",
                    )))
                    .unwrap();
                    let r = sub.handle_submit(req).await;
                    assert_eq!(r.status(), 202);
                    r.headers()["location"]
                        .to_str()
                        .unwrap()
                        .trim_start_matches("/jobs/")
                        .to_string()
                });
            }
            while let Some(id) = batch.join_next().await {
                ids.push(id.unwrap());
            }
        }
        ids
    });

    // Kill a worker at ~25% and another at ~60% of the results; a supervisor would replace
    // each (drained from the set first, like a fleet does on a crash).
    for (k, at) in [(0usize, N / 4), (1, N * 6 / 10)] {
        while (s.metrics.done.get() as usize) < at {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let victim = &mut procs[k];
        victim.proc.kill();
        workers.remove(&victim.id.clone(), Duration::ZERO).await;
        let fresh = Worker::start(&format!("r{k}"), &log);
        workers.add(&fresh.id, fresh.addr);
        workers.ready(&fresh.id);
        procs.push(fresh);
    }
    let ids = submit.await.unwrap();
    assert_eq!(ids.len(), N);
    let mut lost = 0;
    for id in &ids {
        match s.wait_final(id, Duration::from_secs(180)).await {
            JobRecord::Done { response, .. } => assert_eq!(response.status, 200),
            _ => lost += 1,
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(lost, 0, "jobs without a result");
    let runs = executions(&log);
    assert!(ids.iter().all(|id| runs.contains_key(id)));
    let dup_exec: usize = runs.values().map(|n| n - 1).sum();
    assert_eq!(s.metrics.done.get() as usize, N);
    assert!(
        s.metrics.failed_attempts.get() >= 1,
        "the kills cut running attempts"
    );
    let dups = s.metrics.duplicated.get();
    s.shutdown().await;
    (dup_exec, dups, elapsed)
}

/// The fleet follows the backlog: 0 while idle, up as jobs pile up, back to 0 after.
/// A test "provider" starts and stops worker processes as the decisions say.
pub async fn scale_zero_to_n_to_zero<F, Fut>(make: F, dir: &Path) -> Vec<u32>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let log = dir.join("exec.log");
    let workers = WorkerSet::new();
    let mut cfg = dispatcher_config();
    cfg.concurrency = 8;
    let mut s = Stack::new(make().await, &dir.join("j.redb"), workers.clone(), cfg);
    s.start_dispatcher();
    let sampler = BacklogSampler {
        broker: s.broker.clone(),
        metrics: s.metrics.clone(),
    };
    let mut policy = BacklogPolicy::new(BacklogParams {
        target_per_instance: 20.0,
        activation: 0.0,
        min: 0,
        max: 4,
        cooldown_secs: 3.0,
        scale_down_window_secs: 1.0,
        tolerance: 0.1,
    });
    let t0 = Instant::now();
    let mut fleet: Vec<Worker> = Vec::new();
    let mut trace = vec![];
    let mut ids = vec![];
    let mut seq = 0;
    let mut submitted = false;
    loop {
        let now = t0.elapsed().as_secs_f64();
        // Idle for 2 s, then a burst of 150 slow jobs.
        if now > 2.0 && !submitted {
            submitted = true;
            for i in 0..150 {
                let (st, id) = s
                    .post(&format!("/async/work?sleep_ms=100&i={i}"), "", None)
                    .await;
                assert_eq!(st, 202);
                ids.push(id.unwrap());
            }
        }
        let backlog = sampler.sample().await;
        let d = policy.evaluate(BacklogInput {
            now_secs: now,
            wall_epoch_secs: 0.0,
            backlog,
            ready: fleet.len() as u32,
            starting: 0,
            current: fleet.len() as u32,
        });
        while fleet.len() < d.desired as usize {
            seq += 1;
            let w = Worker::start(&format!("s{seq}"), &log);
            workers.add(&w.id, w.addr);
            workers.ready(&w.id);
            fleet.push(w);
        }
        while fleet.len() > d.desired as usize {
            let mut w = fleet.pop().unwrap();
            workers.remove(&w.id, Duration::from_secs(10)).await;
            w.proc.stop(Duration::from_secs(2));
        }
        if trace.last() != Some(&d.desired) {
            trace.push(d.desired);
        }
        let all_done = submitted && s.metrics.done.get() as usize == ids.len();
        if all_done && d.desired == 0 {
            break;
        }
        assert!(
            now < 120.0,
            "did not settle: decisions {trace:?}, backlog {backlog:?}, done {} of {}, in flight {}, duplicates {}",
            s.metrics.done.get(),
            ids.len(),
            s.metrics.in_flight.load(Ordering::Relaxed),
            s.metrics.duplicated.get()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(trace[0], 0, "{trace:?}");
    assert!(trace.iter().any(|&n| n >= 2), "scaled out: {trace:?}");
    assert_eq!(*trace.last().unwrap(), 0);
    assert!(s.metrics.depth.load(Ordering::Relaxed) == 0);
    s.shutdown().await;
    trace
}
