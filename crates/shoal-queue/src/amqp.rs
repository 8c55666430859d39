//! RabbitMQ (AMQP 0.9.1) through `lapin`: a durable queue with a dead-letter queue beside it,
//! persistent messages, publisher confirms, manual acks and a prefetch limit.
//!
//! One background task owns the connection: it connects, declares the queues, publishes the
//! live channels for everyone else, watches the connection and reconnects with backoff. A
//! delivery from a connection that died cannot be acked any more; RabbitMQ requeues it and
//! the dispatcher recognizes the job when it comes back (a counted duplicate).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{Mutex, Notify};

use crate::broker::{Backoff, Broker, BrokerState, ConnState, Delivery, Settle};
use crate::job::Envelope;
use crate::QueueError;

/// RabbitMQ settings.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    pub queue: String,
    /// Unacknowledged deliveries this consumer holds at most.
    pub prefetch: u16,
    /// A publish not confirmed within this is reported as unconfirmed.
    pub confirm_timeout: Duration,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
}

impl AmqpConfig {
    pub fn new(url: &str, queue: &str) -> AmqpConfig {
        AmqpConfig {
            url: url.to_string(),
            queue: queue.to_string(),
            prefetch: 32,
            confirm_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// The dead-letter queue's name.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

struct Live {
    conn: Connection,
    publish: Channel,
    consume: Channel,
    meta: Channel,
}

struct Inner {
    cfg: AmqpConfig,
    state: ConnState,
    live: ArcSwapOption<Live>,
    /// Wakes the connection task when an operation saw the connection fail.
    broken: Notify,
    /// Wakes consumers when a new connection is up.
    up: Notify,
    closed: AtomicBool,
    consumer: Mutex<Option<(Arc<Live>, lapin::Consumer)>>,
    /// Deliveries received and not settled yet (RabbitMQ's passive declare reports only the
    /// ready ones).
    unacked: AtomicI64,
}

/// A RabbitMQ job queue.
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl AmqpBroker {
    /// Starts the connection task; the broker is usable at once (publishes fail with
    /// [`QueueError::Broker`] until the first connection is up).
    pub fn start(cfg: AmqpConfig) -> AmqpBroker {
        let inner = Arc::new(Inner {
            cfg,
            state: ConnState::default(),
            live: ArcSwapOption::empty(),
            broken: Notify::new(),
            up: Notify::new(),
            closed: AtomicBool::new(false),
            consumer: Mutex::new(None),
            unacked: AtomicI64::new(0),
        });
        tokio::spawn(connection_task(inner.clone()));
        AmqpBroker { inner }
    }

    /// Waits until connected (or `timeout`): for startup and tests.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let up = self.inner.up.notified();
            if self.inner.live.load().is_some() {
                return true;
            }
            if tokio::time::timeout_at(deadline, up).await.is_err() {
                return self.inner.live.load().is_some();
            }
        }
    }
}

async fn connect(cfg: &AmqpConfig) -> Result<Live, lapin::Error> {
    let conn = Connection::connect(&cfg.url, ConnectionProperties::default()).await?;
    let publish = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(cfg.dlq().as_str().into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    publish
        .queue_declare(cfg.dlq().as_str().into(), durable, FieldTable::default())
        .await?;
    publish
        .queue_declare(cfg.queue.as_str().into(), durable, args)
        .await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;
    let meta = conn.create_channel().await?;
    Ok(Live {
        conn,
        publish,
        consume,
        meta,
    })
}

async fn connection_task(inner: Arc<Inner>) {
    let mut backoff = Backoff::new(inner.cfg.max_backoff);
    while !inner.closed.load(Ordering::Relaxed) {
        match connect(&inner.cfg).await {
            Ok(live) => {
                tracing::info!(queue = %inner.cfg.queue, "rabbitmq connected");
                backoff.reset();
                let live = Arc::new(live);
                inner.live.store(Some(live.clone()));
                inner.state.set(BrokerState::Connected);
                inner.up.notify_waiters();
                // Watch until an operation reports a failure or the connection says so.
                loop {
                    let broken = inner.broken.notified();
                    if inner.closed.load(Ordering::Relaxed) || !healthy(&live) {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(250), broken).await;
                }
                inner.live.store(None);
                if inner.closed.load(Ordering::Relaxed) {
                    close(&live, 200, "shutdown").await;
                    break;
                }
                tracing::warn!(queue = %inner.cfg.queue, "rabbitmq connection lost");
                inner.state.set(BrokerState::Disconnected);
                inner.state.fail();
                close(&live, 320, "reconnecting").await;
            }
            Err(e) => {
                inner.state.set(BrokerState::Disconnected);
                inner.state.fail();
                tracing::warn!(queue = %inner.cfg.queue, error = %e, "rabbitmq connect failed");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    inner.state.set(BrokerState::Disconnected);
    inner.up.notify_waiters();
}

/// Closes a connection, not waiting long for a peer that may be gone.
async fn close(l: &Live, code: u16, why: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(2), l.conn.close(code, why.into())).await;
}

fn healthy(l: &Live) -> bool {
    l.conn.status().connected()
        && l.publish.status().connected()
        && l.consume.status().connected()
        && l.meta.status().connected()
}

impl Inner {
    fn current(&self) -> Result<Arc<Live>, QueueError> {
        self.live
            .load_full()
            .ok_or_else(|| QueueError::Broker(format!("rabbitmq {}", self.state.get().as_str())))
    }

    fn broken(&self, e: &lapin::Error) -> QueueError {
        self.state.fail();
        self.broken.notify_one();
        QueueError::Broker(e.to_string())
    }

    async fn publish_to(
        &self,
        queue: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<(), QueueError> {
        let live = self.current()?;
        let confirm = live
            .publish
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                // delivery_mode 2: persistent.
                props.with_delivery_mode(2),
            )
            .await
            .map_err(|e| self.broken(&e))?;
        match tokio::time::timeout(self.cfg.confirm_timeout, confirm).await {
            Err(_) => Err(QueueError::Unconfirmed("no confirm in time".into())),
            Ok(Err(e)) => {
                self.broken(&e);
                Err(QueueError::Unconfirmed(e.to_string()))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(QueueError::Broker(format!(
                "queue {queue} does not exist (message returned)"
            ))),
            Ok(Ok(Confirmation::Nack(_))) => Err(QueueError::Unconfirmed("nacked".into())),
            Ok(Ok(Confirmation::NotRequested)) => {
                Err(QueueError::Unconfirmed("confirms not enabled".into()))
            }
        }
    }
}

impl Broker for AmqpBroker {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn queue(&self) -> &str {
        &self.inner.cfg.queue
    }

    fn publish<'a>(&'a self, job: &'a Envelope) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let props = BasicProperties::default().with_message_id(job.id.as_str().into());
            self.inner
                .publish_to(&self.inner.cfg.queue, &job.encode(), props)
                .await
        })
    }

    fn next(&self) -> BoxFuture<'_, Result<Delivery, QueueError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut slot = inner.consumer.lock().await;
            loop {
                if inner.closed.load(Ordering::Relaxed) {
                    return Err(QueueError::Broker("shut down".into()));
                }
                if slot.is_none() {
                    let up = inner.up.notified();
                    let Ok(live) = inner.current() else {
                        let _ = tokio::time::timeout(Duration::from_secs(1), up).await;
                        continue;
                    };
                    match live
                        .consume
                        .basic_consume(
                            inner.cfg.queue.as_str().into(),
                            "shoal".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                    {
                        Ok(c) => *slot = Some((live, c)),
                        Err(e) => {
                            inner.broken(&e);
                            tracing::warn!(error = %e, "rabbitmq consume failed");
                            let _ = tokio::time::timeout(Duration::from_secs(1), up).await;
                            continue;
                        }
                    }
                }
                let Some((live, consumer)) = slot.as_mut() else {
                    continue;
                };
                // A new connection replaced ours: consume on the new one.
                let stale = inner
                    .live
                    .load()
                    .as_ref()
                    .is_none_or(|cur| !Arc::ptr_eq(cur, live));
                if stale {
                    *slot = None;
                    continue;
                }
                let next = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
                match next {
                    Err(_) => continue,
                    Ok(Some(Ok(d))) => {
                        inner.unacked.fetch_add(1, Ordering::Relaxed);
                        return Ok(Delivery {
                            payload: d.data,
                            redelivered: d.redelivered,
                            settle: Box::new(AmqpSettle {
                                acker: d.acker,
                                inner: inner.clone(),
                                done: false,
                            }),
                        });
                    }
                    Ok(Some(Err(e))) => {
                        inner.broken(&e);
                        *slot = None;
                    }
                    Ok(None) => {
                        inner.broken.notify_one();
                        *slot = None;
                    }
                }
            }
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let live = inner.current()?;
            let q = live
                .meta
                .queue_declare(
                    inner.cfg.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| inner.broken(&e))?;
            let unacked = inner.unacked.load(Ordering::Relaxed).max(0) as u64;
            Ok(q.message_count() as u64 + unacked)
        })
    }

    fn state(&self) -> &ConnState {
        &self.inner.state
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Relaxed);
            self.inner.broken.notify_one();
            if let Some(live) = self.inner.live.swap(None) {
                close(&live, 200, "shutdown").await;
            }
            self.inner.up.notify_waiters();
        })
    }
}

struct AmqpSettle {
    acker: lapin::Acker,
    inner: Arc<Inner>,
    done: bool,
}

impl AmqpSettle {
    fn settled(&mut self) {
        if !self.done {
            self.done = true;
            self.inner.unacked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for AmqpSettle {
    fn drop(&mut self) {
        // Dropped unsettled (the dispatcher stopped): RabbitMQ redelivers it when the
        // channel closes; it no longer counts as ours.
        self.settled();
    }
}

impl Settle for AmqpSettle {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            let r = self.acker.ack(BasicAckOptions::default()).await;
            self.settled();
            r.map(|_| ()).map_err(|e| self.inner.broken(&e))
        })
    }

    fn dead_letter(
        mut self: Box<Self>,
        job: Vec<u8>,
        error: String,
    ) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            let mut headers = FieldTable::default();
            headers.insert(
                "x-shoal-error".into(),
                AMQPValue::LongString(error.as_str().into()),
            );
            let dlq = self.inner.cfg.dlq();
            // Publish (confirmed) first, then ack: a crash between the two leaves a copy in
            // both queues, never in neither.
            let published = self
                .inner
                .publish_to(&dlq, &job, BasicProperties::default().with_headers(headers))
                .await;
            if let Err(e) = published {
                // The queue's own dead-letter route (declared with it) takes the job
                // instead, without the error header: never stranded unacked, never lost.
                let r = self
                    .acker
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
                self.settled();
                tracing::warn!(queue = %dlq, error = %e, "dead-letter publish failed; rejected to the queue's dead-letter route");
                return r.map(|_| ()).map_err(|n| self.inner.broken(&n));
            }
            let r = self.acker.ack(BasicAckOptions::default()).await;
            self.settled();
            r.map(|_| ()).map_err(|e| self.inner.broken(&e))
        })
    }
}
