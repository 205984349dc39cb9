//! `OrderWriter` (services mode): moves the order log from RabbitMQ into
//! PostgreSQL.
//!
//! A pool of these actors (`orders.writers`) each holds its own RabbitMQ
//! channel (manual acks, `orders.writer_prefetch` in flight) and its own
//! PostgreSQL connection. The deliveries that arrive within
//! `orders.writer_gather_ms` of the first (or while the previous write runs)
//! are applied together with one statement, idempotently, and acked with one
//! ack only after that commit: a crash between the two redelivers the
//! messages, which then change nothing. The buyer's 201 waited for the log's
//! confirm, not for this write, so the wait costs no buyer anything, and
//! PostgreSQL's cost is partly per statement and commit.
//! A message that can never be applied is rejected to the dead-letter queue
//! and counted; a transient failure is retried with backoff, in place, so the
//! order of the log is kept and nothing loops through the queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tracing::Instrument;

use super::{ApplyError, LogMessage};
use crate::config::{OrderSettings, RabbitSettings};
use crate::persistence::postgres::LogApplier;
use crate::persistence::rabbit;

/// Counters shared by the whole writer pool.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Deliveries received and not yet acked or rejected.
    pub in_flight: AtomicUsize,
    pub messages_written: AtomicU64,
    pub rows_written: AtomicU64,
    /// Statements committed (each holds one or more messages).
    pub writes: AtomicU64,
    pub dead_letters: AtomicU64,
    pub retries: AtomicU64,
    pub connected: AtomicUsize,
    pub last_batch_us: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl WriterStats {
    pub(super) fn set_error(&self, e: impl std::fmt::Display) {
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
    /// Told what each write put in PostgreSQL, so that reads of those orders
    /// go there from now on and memory does not keep them.
    pub directory: Arc<crate::actors::registry::SaleRegistry>,
}

pub struct OrderWriter {
    index: usize,
    config: WriterConfig,
    stats: Arc<WriterStats>,
    client: Option<LogApplier>,
    link: Option<(Connection, Channel)>,
    backoff: Duration,
    stopping: bool,
    /// Deliveries received while a write runs; the next write takes them all.
    waiting: Vec<Delivery>,
    writing: bool,
    /// A write is due when `orders.writer_gather_ms` has passed since the
    /// first of `waiting` arrived (set while that wait runs).
    gathering: bool,
    /// Told when the writer holds nothing any more (for `StopWriter`).
    on_idle: Option<tokio::sync::oneshot::Sender<()>>,
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
            waiting: Vec::new(),
            writing: false,
            gathering: false,
            on_idle: None,
        }
    }

    /// Writes every waiting delivery in one go, then looks again. Unless
    /// the writer is stopping or holds `orders.writer_prefetch` deliveries
    /// (all the broker sends it), the first delivery waits up to
    /// `orders.writer_gather_ms` for others to join its write: a buyer's
    /// 201 waits for the log's confirm, never for this write, and
    /// PostgreSQL's cost is partly per statement and commit.
    fn write_waiting(&mut self, ctx: &mut Context<Self>) {
        if self.writing {
            return;
        }
        if self.waiting.is_empty() {
            if let Some(idle) = self.on_idle.take() {
                let _ = idle.send(());
            }
            return;
        }
        let gather = Duration::from_millis(self.config.orders.writer_gather_ms);
        let full = self.waiting.len() >= usize::from(self.config.orders.writer_prefetch);
        if !gather.is_zero() && !full && !self.stopping {
            if !self.gathering {
                self.gathering = true;
                ctx.run_later(gather, |act, ctx| {
                    act.gathering = false;
                    act.write_now(ctx);
                });
            }
            return;
        }
        self.write_now(ctx);
    }

    /// Writes every waiting delivery in one statement unless a write runs
    /// (its end looks again).
    fn write_now(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.waiting.is_empty() {
            return;
        }
        self.writing = true;
        let deliveries = std::mem::take(&mut self.waiting);
        let count = deliveries.len();
        let store = self.client.take();
        let config = self.config.clone();
        let stats = self.stats.clone();
        ctx.spawn(
            async move { write_deliveries(store, &config, &stats, deliveries).await }
                .instrument(tracing::debug_span!("order_writer", writer = self.index))
                .into_actor(self)
                .map(move |store, act, ctx| {
                    act.client = store;
                    act.writing = false;
                    act.stats.in_flight.fetch_sub(count, Ordering::AcqRel);
                    act.write_waiting(ctx);
                }),
        );
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
        let deadline = Duration::from_millis(self.config.rabbit.connect_timeout_ms);
        let fut = async move {
            tokio::time::timeout(deadline, fut)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} ms", deadline.as_millis())))
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
        self.waiting.push(delivery);
        self.write_waiting(ctx);
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

/// Stops a writer once it has written the deliveries it holds, closing its
/// connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopWriter;

impl Handler<StopWriter> for OrderWriter {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopWriter, ctx: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        let (idle_tx, idle) = tokio::sync::oneshot::channel();
        self.on_idle = Some(idle_tx);
        self.write_waiting(ctx);
        Box::pin(
            async move {
                let _ = idle.await;
            }
            .into_actor(self)
            .then(|_, act, _| {
                let link = act.link.take();
                async move {
                    if let Some((conn, _channel)) = link {
                        // Closing the connection closes its channel.
                        rabbit::close(&conn, "shutdown").await;
                    }
                }
                .into_actor(act)
            })
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}

async fn connect_db(config: &tokio_postgres::Config) -> Result<LogApplier, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    actix::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "order writer database connection closed");
        }
    });
    LogApplier::new(client).await
}

/// Applies deliveries taken together (what arrived while the previous write
/// ran), retrying transient failures until they are written; acks each after
/// the commit or rejects it to the dead-letter queue. Returns the database
/// session for the next write.
///
/// Taking every waiting message into one statement makes the writers'
/// batches grow by themselves when they fall behind, which is when the
/// per-statement cost matters. If such a statement is refused for its data,
/// each message is applied alone so that only the bad one is dead-lettered.
pub async fn write_deliveries(
    mut store: Option<LogApplier>,
    config: &WriterConfig,
    stats: &WriterStats,
    deliveries: Vec<Delivery>,
) -> Option<LogApplier> {
    let mut decoded = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match super::decode(&delivery.data) {
            Ok(msg) => decoded.push((delivery, msg)),
            Err(e) => dead_letter(&delivery, stats, &e).await,
        }
    }
    // When a set is refused, some message in it is bad: find it below.
    if decoded.len() > 1
        && write_messages(&mut store, config, stats, &decoded)
            .await
            .is_ok()
    {
        return store;
    }
    for one in decoded.chunks(1) {
        if let Err(e) = write_messages(&mut store, config, stats, one).await {
            dead_letter(&one[0].0, stats, &e).await;
        }
    }
    store
}

/// Applies `messages` in one statement, retrying transient failures with
/// backoff; acks every delivery once written. Errs only when the data is
/// refused (nothing was written and nothing acked).
async fn write_messages(
    store: &mut Option<LogApplier>,
    config: &WriterConfig,
    stats: &WriterStats,
    messages: &[(Delivery, LogMessage)],
) -> Result<(), ApplyError> {
    let msgs: Vec<&LogMessage> = messages.iter().map(|(_, m)| m).collect();
    tracing::debug!(messages = msgs.len(), "writing order-log messages");
    let mut backoff = Duration::from_millis(config.orders.retry_initial_ms.max(1));
    let max = Duration::from_millis(config.orders.retry_max_ms);
    loop {
        if store.as_ref().is_none_or(|c| c.is_closed()) {
            match connect_db(&config.database).await {
                Ok(c) => *store = Some(c),
                Err(e) => {
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    stats.set_error(format!("database: {e}"));
                    config.breakers.postgres.record_failure(&e);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "order writer cannot reach PostgreSQL");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            }
        }
        let Some(c) = store.as_mut() else { continue };
        let started = std::time::Instant::now();
        match c.apply(&msgs).await {
            Ok(rows) => {
                config.breakers.postgres.record_success();
                config
                    .metrics
                    .writer_batch_latency
                    .observe(started.elapsed().as_secs_f64());
                stats
                    .last_batch_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                // One ack for the set: `multiple` acks every delivery of
                // this channel up to the last one, and every earlier one
                // has been written or dead-lettered (deliveries are taken
                // in order); one ack per delivery was one more broker
                // operation per message.
                if let Some((last, _)) = messages.iter().max_by_key(|(d, _)| d.delivery_tag) {
                    let ack = last.ack(BasicAckOptions { multiple: true });
                    match tokio::time::timeout(rabbit::CALL_TIMEOUT, ack).await {
                        Ok(Ok(_)) => {}
                        // Written but not acked: the broker redelivers them
                        // and the idempotent apply changes nothing.
                        Ok(Err(e)) => tracing::warn!(error = %e, "ack failed after commit"),
                        Err(_) => tracing::warn!("ack not answered in time after commit"),
                    }
                }
                stats
                    .messages_written
                    .fetch_add(messages.len() as u64, Ordering::Relaxed);
                stats.rows_written.fetch_add(rows, Ordering::Relaxed);
                stats.writes.fetch_add(1, Ordering::Relaxed);
                config.directory.orders.forget_written(
                    msgs.iter()
                        .flat_map(|m| &m.entries)
                        .map(|e| (e.order_id(), e.order().status)),
                );
                return Ok(());
            }
            Err(e @ ApplyError::Malformed(_)) => return Err(e),
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
    let reject = delivery.reject(BasicRejectOptions { requeue: false });
    match tokio::time::timeout(rabbit::CALL_TIMEOUT, reject).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "reject failed; the message will be redelivered"),
        Err(_) => tracing::warn!("reject not answered in time; the message will be redelivered"),
    }
}
