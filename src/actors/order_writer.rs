//! `OrderWriter`: moves the order log from RabbitMQ into PostgreSQL.
//!
//! A pool of these actors (`orders.writers`) each holds its own RabbitMQ
//! channel (manual acks, `orders.writer_prefetch` in flight) and its own
//! PostgreSQL connection. A delivery is applied in one transaction with one
//! statement per kind of entry, idempotently, and acked only after the commit:
//! a crash between the two redelivers the message, which then changes nothing.
//! A message that can never be applied is rejected to the dead-letter queue
//! and counted; a transient failure is retried with backoff, in place, so the
//! order of the log is kept and nothing loops through the queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tracing::Instrument;

use crate::config::{OrderSettings, RabbitSettings};
use crate::persistence::order_log::{self, ApplyError};
use crate::persistence::rabbit;

/// Counters shared by the whole writer pool.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Deliveries received and not yet acked or rejected.
    pub in_flight: AtomicUsize,
    pub messages_written: AtomicU64,
    pub rows_written: AtomicU64,
    pub dead_letters: AtomicU64,
    pub retries: AtomicU64,
    pub connected: AtomicUsize,
    pub last_batch_us: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl WriterStats {
    fn set_error(&self, e: impl std::fmt::Display) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

/// What a writer needs to connect and retry.
#[derive(Clone)]
pub struct WriterConfig {
    pub rabbit: RabbitSettings,
    pub orders: OrderSettings,
    pub database: tokio_postgres::Config,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub breakers: Arc<crate::breaker::Breakers>,
}

pub struct OrderWriter {
    index: usize,
    config: WriterConfig,
    stats: Arc<WriterStats>,
    client: Option<tokio_postgres::Client>,
    link: Option<(Connection, Channel)>,
    backoff: Duration,
    stopping: bool,
}

impl OrderWriter {
    pub fn new(index: usize, config: WriterConfig, stats: Arc<WriterStats>) -> Self {
        let backoff = Duration::from_millis(config.orders.retry_initial_ms.max(1));
        OrderWriter {
            index,
            config,
            stats,
            client: None,
            link: None,
            backoff,
            stopping: false,
        }
    }

    /// Connects to the broker and starts consuming; retries with backoff.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        let rabbit = self.config.rabbit.clone();
        let prefetch = self.config.orders.writer_prefetch;
        let name = format!("flashsale-writer-{}", self.index);
        let fut = async move {
            let (conn, channel) = rabbit::open(&rabbit, &name)
                .await
                .map_err(|e| e.to_string())?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let consumer = channel
                .basic_consume(
                    rabbit.queue.as_str().into(),
                    name.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, channel, consumer))
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok((conn, channel, consumer)) => {
                act.link = Some((conn, channel));
                act.backoff = Duration::from_millis(act.config.orders.retry_initial_ms.max(1));
                act.stats.connected.fetch_add(1, Ordering::Relaxed);
                ctx.add_stream(consumer);
            }
            Err(e) => {
                tracing::warn!(writer = act.index, error = %e, "order writer cannot reach RabbitMQ");
                act.stats.set_error(&e);
                act.retry_connect(ctx);
            }
        }));
    }

    fn retry_connect(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let delay = self.backoff;
        self.backoff =
            (self.backoff * 2).min(Duration::from_millis(self.config.orders.retry_max_ms));
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }
}

impl Actor for OrderWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.connect(ctx);
    }
}

impl StreamHandler<lapin::Result<Delivery>> for OrderWriter {
    fn handle(&mut self, item: lapin::Result<Delivery>, ctx: &mut Self::Context) {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(writer = self.index, error = %e, "order-log consumer error");
                self.stats.set_error(&e);
                return;
            }
        };
        self.stats.in_flight.fetch_add(1, Ordering::AcqRel);
        let client = self.client.take();
        let config = self.config.clone();
        let stats = self.stats.clone();
        // `wait`: one delivery at a time per writer, in the order received.
        ctx.wait(
            async move { write_delivery(client, &config, &stats, delivery).await }
                .instrument(tracing::debug_span!("order_writer", writer = self.index))
                .into_actor(self)
                .map(|client, act, _| {
                    act.client = client;
                    act.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
                }),
        );
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        self.link = None;
        if !self.stopping {
            tracing::warn!(
                writer = self.index,
                "order-log consumer ended; reconnecting"
            );
            self.retry_connect(ctx);
        }
    }
}

/// Stops a writer after the delivery it holds, closing its connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopWriter;

impl Handler<StopWriter> for OrderWriter {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopWriter, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        let link = self.link.take();
        Box::pin(
            async move {
                if let Some((conn, _channel)) = link {
                    // Closing the connection closes its channel.
                    let _ = conn.close(200, "shutdown".into()).await;
                }
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}

async fn connect_db(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    actix::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "order writer database connection closed");
        }
    });
    Ok(client)
}

/// Applies one delivery, retrying transient failures until it is written;
/// acks it after the commit or rejects it to the dead-letter queue. Returns
/// the database connection for the next delivery.
pub async fn write_delivery(
    mut client: Option<tokio_postgres::Client>,
    config: &WriterConfig,
    stats: &WriterStats,
    delivery: Delivery,
) -> Option<tokio_postgres::Client> {
    let msg = match order_log::decode(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            dead_letter(&delivery, stats, &e).await;
            return client;
        }
    };
    tracing::debug!(entries = msg.entries.len(), "writing order-log message");
    let mut backoff = Duration::from_millis(config.orders.retry_initial_ms.max(1));
    let max = Duration::from_millis(config.orders.retry_max_ms);
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect_db(&config.database).await {
                Ok(c) => Some(c),
                Err(e) => {
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    stats.set_error(format!("database: {e}"));
                    config.breakers.postgres.record_failure(&e);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "order writer cannot reach PostgreSQL");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        let started = std::time::Instant::now();
        match order_log::apply(c, &msg).await {
            Ok(rows) => {
                config.breakers.postgres.record_success();
                config
                    .metrics
                    .writer_batch_latency
                    .observe(started.elapsed().as_secs_f64());
                stats
                    .last_batch_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    // Written but not acked: the broker redelivers it and the
                    // idempotent apply changes nothing.
                    tracing::warn!(error = %e, "ack failed after commit");
                }
                stats.messages_written.fetch_add(1, Ordering::Relaxed);
                stats.rows_written.fetch_add(rows, Ordering::Relaxed);
                return client;
            }
            Err(e @ ApplyError::Malformed(_)) => {
                dead_letter(&delivery, stats, &e).await;
                return client;
            }
            Err(ApplyError::Transient(e)) => {
                stats.retries.fetch_add(1, Ordering::Relaxed);
                stats.set_error(format!("database: {e}"));
                config.breakers.postgres.record_failure(&e);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "order-log write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

async fn dead_letter(delivery: &Delivery, stats: &WriterStats, e: &ApplyError) {
    tracing::error!(error = %e, bytes = delivery.data.len(), "order-log message dead-lettered");
    stats.dead_letters.fetch_add(1, Ordering::Relaxed);
    stats.set_error(e);
    if let Err(e) = delivery.reject(BasicRejectOptions { requeue: false }).await {
        tracing::warn!(error = %e, "reject failed; the message will be redelivered");
    }
}

/// Recovery: pulls every message the queue holds (no consumers yet) and
/// writes it, until the queue is empty. Returns the messages handled.
pub async fn drain_queue(
    config: &WriterConfig,
    stats: &WriterStats,
    timeout: Duration,
) -> Result<u64, String> {
    let (conn, channel) = rabbit::open(&config.rabbit, "flashsale-recovery")
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut client = None;
    let mut handled = 0;
    loop {
        if tokio::time::Instant::now() > deadline {
            let left = rabbit::queue_depth(&channel, &config.rabbit.queue)
                .await
                .unwrap_or(0);
            let _ = conn.close(200, "recovery".into()).await;
            return Err(format!(
                "{left} order-log messages still queued after {} s",
                timeout.as_secs()
            ));
        }
        let got = channel
            .basic_get(
                config.rabbit.queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let Some(message) = got else { break };
        client = write_delivery(client, config, stats, message.delivery).await;
        handled += 1;
    }
    let _ = conn.close(200, "recovery done".into()).await;
    Ok(handled)
}

/// Waits until the order queue is empty and no writer holds a delivery, seen
/// twice in a row a little apart (a delivery can sit between the broker and
/// a writer for a moment). False if that did not happen within `timeout`.
pub async fn wait_drained(
    channel: &Channel,
    queue: &str,
    stats: &WriterStats,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_rounds = 0;
    while tokio::time::Instant::now() < deadline {
        let depth = rabbit::queue_depth(channel, queue).await;
        let idle = stats.in_flight.load(Ordering::Acquire) == 0;
        if matches!(depth, Ok(0)) && idle {
            quiet_rounds += 1;
            if quiet_rounds >= 2 {
                return true;
            }
        } else {
            quiet_rounds = 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
