//! `OrderPublisher`: group commit of order-log entries into a [`Sink`].
//!
//! Stock actors hand entries over a bounded channel (`try_publish`: a full
//! channel is an explicit "overloaded", never a wait). One task collects
//! them into batches and appends each to the sink, with at most
//! `orders.max_unconfirmed_batches` in flight. A batch is formed only once
//! it has a place in flight, so while every place waits for its confirm the
//! entries pile up and the next batch takes them all (up to
//! `orders.batch_max_orders`, after waiting for more while earlier batches
//! are still unconfirmed, until they are confirmed or the sink's
//! [`Sink::batch_delay`] has passed): batches grow with the backlog and
//! with the sink's confirm time, and the sink sees fewer,
//! larger appends when it is busiest. A batch free to go that holds fewer
//! entries than the one before it waits at most [`Sink::batch_gather`] for
//! as many: under a rush the stragglers of one wave of buyers go with the
//! next, not in a small message of their own. When a batch's confirm
//! arrives, every sale in it is told with one [`Settled`] message; that is
//! when shoppers get their 201. The sink's backlog (RabbitMQ's queue depth,
//! for admission control) is sampled by a task of its own, never by the
//! publish loop.
//!
//! The sink is the storage mode's: [`RabbitSink`] publishes a batch as one
//! persistent message on a channel in confirm mode (services);
//! [`SqliteSink`] commits it in one transaction with a full sync, and the
//! commit is the confirm (embedded). The loop, its bounds and its failure
//! handling are the same for both.
//!
//! Failures never oversell, never acknowledge what is not durable, and never
//! drop a decision a stock actor has applied:
//! - *reservations* never handed to the sink (it is not open) are
//!   `released` at once: nobody was told yes, the units go back;
//! - *transitions* (payments, cancellations, expiries) are decisions already
//!   applied by their actor: they are never released. With any reservation
//!   whose publish or confirm failed, they are `in_doubt` and go to the
//!   [`resolve`] task, which decides them in the store beside publishing
//!   (one statement per batch, with backoff while the store is away):
//!   a transition is written there directly (the upsert is idempotent and
//!   order-independent, see `order_log`); a reservation the store has
//!   stands, and one it lacks is voided (so no late copy can land) and its
//!   units released. At shutdown what is still in doubt gets one more try.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakRecipient;
use futures_util::future::LocalBoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{mpsc, watch, Semaphore};
use uuid::Uuid;

use super::writer::WriterStats;
use super::{encode, LogEntry};
use crate::breaker::{Breakers, CircuitBreaker};
use crate::config::{OrderSettings, RabbitSettings};
use crate::persistence::rabbit;
use crate::persistence::sqlite::{SqliteLog, SqliteStore};
use crate::persistence::store::SharedStore;

/// The outcome of published entries, sent to the stock actor of their sale.
#[derive(Debug, Default, Message)]
#[rtype(result = "()")]
pub struct Settled {
    /// Durable: confirmed by the sink, or found in the store.
    pub confirmed: Vec<Uuid>,
    /// Publish failed with the outcome unknown; decided later (for a
    /// transition: made durable later).
    pub in_doubt: Vec<Uuid>,
    /// Reservations that are not durable and never will be: give the units
    /// back. Never a transition.
    pub released: Vec<Uuid>,
    /// The store itself already holds the confirmed entries in their new
    /// state (the sink is the store, or the entries were decided there), so
    /// reads need no copy of them in memory.
    pub stored: bool,
}

/// An entry for the log and who to tell when it settles.
pub struct PublishRequest {
    pub entry: LogEntry,
    pub sale_id: Uuid,
    pub notify: Arc<WeakRecipient<Settled>>,
}

/// Why an entry was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefused {
    /// Too many entries wait already: shed load.
    Full,
    /// The order log is not open, or shutting down.
    Down,
}

/// Live numbers about the publisher, read by readiness and admin status.
#[derive(Debug, Default)]
pub struct PublisherStats {
    pub connected: AtomicBool,
    pub closing: AtomicBool,
    pub unconfirmed_batches: AtomicUsize,
    pub batches_confirmed: AtomicU64,
    pub entries_confirmed: AtomicU64,
    pub batches_failed: AtomicU64,
    pub in_doubt: AtomicUsize,
    pub released: AtomicU64,
    pub last_confirm_us: AtomicU64,
    pub reconnects: AtomicU64,
    /// Messages ready in the order queue, sampled about once a second.
    pub queue_depth: std::sync::atomic::AtomicU32,
    pub last_error: Mutex<Option<String>>,
    /// A confirm or a probe went unanswered past its deadline: the link is
    /// treated as broken and opened again.
    stalled: AtomicBool,
}

impl PublisherStats {
    fn set_error(&self, e: impl std::fmt::Display) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

/// The handle stock actors publish through. Cheap to clone.
#[derive(Clone)]
pub struct OrderPublisher {
    tx: mpsc::Sender<PublishRequest>,
    stats: Arc<PublisherStats>,
    stop: Arc<watch::Sender<bool>>,
}

/// What the publisher task needs.
pub struct PublisherDeps {
    pub orders: OrderSettings,
    /// Where entries in doubt are decided.
    pub store: SharedStore,
    pub writers: Arc<WriterStats>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub breakers: Arc<crate::breaker::Breakers>,
}

impl OrderPublisher {
    /// Starts the publisher task on `arbiter` (its sink's link lives
    /// there too). The returned receiver resolves when the publisher has
    /// stopped (after [`Self::shutdown`]).
    pub fn start<S: Sink>(
        arbiter: &actix::ArbiterHandle,
        sink: S,
        deps: PublisherDeps,
    ) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = mpsc::channel(deps.orders.publish_queue_capacity);
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(PublisherStats::default());
        let (done, task) = tokio::sync::oneshot::channel();
        let task_stats = stats.clone();
        // The task keeps `Rc`s (it is single-threaded by design), so it is
        // spawned from inside the arbiter rather than sent to it.
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                run(sink, rx, stop_rx, deps, task_stats).await;
                let _ = done.send(());
            });
        });
        (
            OrderPublisher {
                tx,
                stats,
                stop: Arc::new(stop),
            },
            task,
        )
    }

    /// Hands an entry over without waiting.
    pub fn try_publish(&self, req: PublishRequest) -> Result<(), PublishRefused> {
        if !self.is_up() {
            return Err(PublishRefused::Down);
        }
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PublishRefused::Full,
            mpsc::error::TrySendError::Closed(_) => PublishRefused::Down,
        })
    }

    /// Connected and not shutting down.
    pub fn is_up(&self) -> bool {
        self.stats.connected.load(Ordering::Acquire) && !self.stats.closing.load(Ordering::Acquire)
    }

    /// Entries waiting to be batched.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }

    /// Stops taking entries; the task publishes what it holds, waits for every
    /// confirm, and ends.
    pub fn shutdown(&self) {
        self.stats.closing.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }
}

/// A batch's confirm: `Ok` once the batch is durable.
pub type Confirm = LocalBoxFuture<'static, Result<(), String>>;

/// Where the group commit appends its batches: one implementation per
/// storage mode. Runs on the publisher's thread (nothing here need be Send).
#[allow(async_fn_in_trait)]
pub trait Sink: Send + 'static {
    /// An open link to the sink (a connection and its channel, a database
    /// connection of its own).
    type Link;

    /// What messages call it ("RabbitMQ", "SQLite").
    fn name(&self) -> &'static str;

    /// The breaker that sees this sink's failures.
    fn breaker(&self) -> fn(&Breakers) -> &CircuitBreaker;

    async fn open(&self) -> Result<Self::Link, String>;

    fn is_open(&self, link: &Self::Link) -> bool;

    /// Batches appended but not yet in the store (admission control and
    /// the resolver's wait); sampled about once a second.
    async fn backlog(&self, link: &Self::Link) -> Result<u32, String>;

    /// Appends one batch: `Ok` with its confirm once the sink has it.
    async fn append(&self, link: &Self::Link, entries: &[&LogEntry]) -> Result<Confirm, String>;

    /// Whether a confirmed batch is already in the store ([`Settled::stored`]).
    fn confirms_into_store(&self) -> bool;

    /// How long a batch waits for more entries while others are in flight:
    /// `orders.batch_max_delay_us` unless the sink has a figure of its own.
    fn batch_delay(&self, orders: &OrderSettings) -> Duration {
        Duration::from_micros(orders.batch_max_delay_us)
    }

    /// How long a batch that may go waits at most to hold as many entries
    /// as the batch before it: `orders.batch_gather_us` unless the sink has
    /// a figure of its own.
    fn batch_gather(&self, orders: &OrderSettings) -> Duration {
        Duration::from_micros(orders.batch_gather_us)
    }

    async fn close(&self, link: &Self::Link);
}

/// Services mode: one persistent message per batch on a confirm-mode
/// channel; the broker's confirm makes it durable, the writers move it on.
pub struct RabbitSink {
    pub settings: RabbitSettings,
}

/// A connection to RabbitMQ and its confirm-mode channel.
pub struct RabbitLink {
    conn: Connection,
    channel: Channel,
}

impl Sink for RabbitSink {
    type Link = RabbitLink;

    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    fn breaker(&self) -> fn(&Breakers) -> &CircuitBreaker {
        |b| &b.rabbitmq
    }

    async fn open(&self) -> Result<RabbitLink, String> {
        let (conn, channel) = rabbit::open(&self.settings, "flashsale-publisher")
            .await
            .map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(RabbitLink { conn, channel })
    }

    fn is_open(&self, link: &RabbitLink) -> bool {
        link.channel.status().connected()
    }

    async fn backlog(&self, link: &RabbitLink) -> Result<u32, String> {
        rabbit::queue_depth(&link.channel, &self.settings.queue).await
    }

    async fn append(&self, link: &RabbitLink, entries: &[&LogEntry]) -> Result<Confirm, String> {
        let payload = encode(entries);
        let confirm = link
            .channel
            .basic_publish(
                "".into(),
                self.settings.queue.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/octet-stream".into()),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(Box::pin(async move {
            match confirm.await {
                Ok(c) if c.is_ack() => Ok(()),
                Ok(_) => Err("negative confirm".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        }))
    }

    fn confirms_into_store(&self) -> bool {
        false
    }

    /// RabbitMQ's CPU is mostly per message, so its batches wait longer
    /// (`rabbitmq.batch_max_delay_us`).
    fn batch_delay(&self, _: &OrderSettings) -> Duration {
        Duration::from_micros(self.settings.batch_max_delay_us)
    }

    /// Likewise, a rush's stragglers wait for the wave behind them
    /// (`rabbitmq.batch_gather_us`).
    fn batch_gather(&self, _: &OrderSettings) -> Duration {
        Duration::from_micros(self.settings.batch_gather_us)
    }

    async fn close(&self, link: &RabbitLink) {
        rabbit::close(&link.conn, "closing").await;
    }
}

/// Embedded mode: one transaction per batch in the SQLite file, committed
/// with a full sync; the commit is the confirm, and the rows are then in
/// the store.
pub struct SqliteSink {
    pub store: SqliteStore,
}

impl Sink for SqliteSink {
    type Link = SqliteLog;

    fn name(&self) -> &'static str {
        "SQLite"
    }

    fn breaker(&self) -> fn(&Breakers) -> &CircuitBreaker {
        |b| &b.sqlite
    }

    async fn open(&self) -> Result<SqliteLog, String> {
        self.store.open_log().await.map_err(|e| e.to_string())
    }

    fn is_open(&self, link: &SqliteLog) -> bool {
        link.is_open()
    }

    async fn backlog(&self, _: &SqliteLog) -> Result<u32, String> {
        Ok(0)
    }

    async fn append(&self, link: &SqliteLog, entries: &[&LogEntry]) -> Result<Confirm, String> {
        let commit = link.append(entries.iter().map(|e| e.order().clone()).collect())?;
        Ok(Box::pin(async move {
            commit
                .await
                .unwrap_or_else(|_| Err("the SQLite log writer stopped".to_owned()))
        }))
    }

    fn confirms_into_store(&self) -> bool {
        true
    }

    async fn close(&self, _: &SqliteLog) {}
}

/// Tells each sale in `reqs` its outcome, one message per sale.
/// `stored`: see [`Settled::stored`].
fn notify<'a>(
    reqs: impl IntoIterator<Item = &'a PublishRequest>,
    outcome: fn(&mut Settled) -> &mut Vec<Uuid>,
    stored: bool,
) {
    let mut by_sale: HashMap<Uuid, (&WeakRecipient<Settled>, Settled)> = HashMap::new();
    for req in reqs {
        let slot = by_sale.entry(req.sale_id).or_insert_with(|| {
            (
                &req.notify,
                Settled {
                    stored,
                    ..Settled::default()
                },
            )
        });
        outcome(&mut slot.1).push(req.entry.order_id());
    }
    for (_, (recipient, settled)) in by_sale {
        // Bounded by the number of batches in flight, not by requests. A
        // sale whose actor has stopped has nobody left to tell.
        if let Some(recipient) = recipient.upgrade() {
            recipient.do_send(settled);
        }
    }
}

/// Entries in doubt, shared by the publish loop (which adds) and the
/// resolver (which decides); both run on the publisher's thread.
#[derive(Clone, Default)]
struct Doubtful {
    entries: Rc<RefCell<Vec<PublishRequest>>>,
    added: Rc<tokio::sync::Notify>,
}

impl Doubtful {
    fn add(&self, reqs: Vec<PublishRequest>, stats: &PublisherStats) {
        if reqs.is_empty() {
            return;
        }
        stats.in_doubt.fetch_add(reqs.len(), Ordering::Relaxed);
        notify(&reqs, |s| &mut s.in_doubt, false);
        self.entries.borrow_mut().extend(reqs);
        self.added.notify_one();
    }

    fn take(&self, most: usize) -> Vec<PublishRequest> {
        let mut all = self.entries.borrow_mut();
        let n = all.len().min(most);
        all.drain(..n).collect()
    }

    fn put_back(&self, reqs: Vec<PublishRequest>) {
        self.entries.borrow_mut().extend(reqs);
    }

    fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }
}

async fn run<S: Sink>(
    sink: S,
    mut rx: mpsc::Receiver<PublishRequest>,
    mut stop: watch::Receiver<bool>,
    deps: PublisherDeps,
    stats: Arc<PublisherStats>,
) {
    let deps = Rc::new(deps);
    let sink = Rc::new(sink);
    let cfg = &deps.orders;
    let max_batches = cfg.max_unconfirmed_batches;
    let permits = Arc::new(Semaphore::new(max_batches));
    let doubtful = Doubtful::default();
    let resolver = actix::spawn(resolve(doubtful.clone(), deps.clone(), stats.clone()));
    // The open link, shared with the backlog probe (same thread).
    let link: Rc<RefCell<Option<Rc<S::Link>>>> = Rc::default();
    let probe = actix::spawn(probe_backlog(sink.clone(), link.clone(), stats.clone()));
    let initial_backoff = Duration::from_millis(cfg.reconnect_initial_ms.max(1));
    let mut backoff = initial_backoff;
    let max_delay = sink.batch_delay(cfg);
    let gather = sink.batch_gather(cfg);
    // Entries in the batch appended last: under a steady load, about what
    // the next one can expect.
    let mut last_size = 0;
    let breaker = sink.breaker()(&deps.breakers);
    let look_around = Duration::from_millis(250);

    loop {
        let stopping = *stop.borrow();
        let stalled = stats.stalled.swap(false, Ordering::AcqRel);
        let open = link
            .borrow()
            .clone()
            .filter(|l| !stalled && sink.is_open(l));
        let current = if let Some(open) = open {
            open
        } else {
            stats.connected.store(false, Ordering::Release);
            let old = link.borrow_mut().take();
            if let Some(old) = old {
                sink.close(&old).await;
            }
            if stopping {
                break;
            }
            match sink.open().await {
                Ok(l) => {
                    tracing::info!(sink = sink.name(), "order log open");
                    breaker.record_success();
                    let l = Rc::new(l);
                    *link.borrow_mut() = Some(l.clone());
                    backoff = initial_backoff;
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    stats.connected.store(true, Ordering::Release);
                    l
                }
                Err(e) => {
                    tracing::warn!(sink = sink.name(), error = %e, retry_in_ms = backoff.as_millis() as u64, "order log cannot be opened");
                    breaker.record_failure(&e);
                    stats.set_error(&e);
                    // Whatever waits now was never handed to the sink.
                    release_queued(&mut rx, &stats, &doubtful);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(cfg.reconnect_max_ms));
                    continue;
                }
            }
        };

        // A place in flight first: while every place waits for its confirm,
        // entries pile up in the channel, and the next batch takes them all.
        // So batches grow with the backlog, and the sink sees fewer, larger
        // appends exactly when it is busiest.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = tokio::time::sleep(look_around) => continue,
        };
        // Wait for the first entry of a batch (or a reason to look around).
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.changed(), if !stopping => continue,
            _ = tokio::time::sleep(look_around) => {
                if stopping && rx.is_empty() { break; }
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        // Group commit: while other batches are in flight, give this one a
        // moment to fill (this batch holds one of the places), but no longer
        // than until they are all confirmed: a sink that keeps up is never
        // made to wait for nothing, and one that falls behind (confirms
        // slower than the delay) gets the delay's larger batches.
        let others = max_batches - 1 - permits.available_permits();
        if others > 0 && !max_delay.is_zero() {
            // Wait without polling the channel: senders then do not wake
            // this task once per entry, and the batch fills meanwhile. The
            // other places all free only when every earlier batch is
            // confirmed; taking them is only a signal, given back at once.
            tokio::select! {
                _ = tokio::time::sleep(max_delay) => {}
                _ = permits.acquire_many(others as u32) => {}
            }
        }
        take_waiting(&mut rx, &mut batch, cfg.batch_max_orders);
        // Gather: a batch that may go but holds fewer entries than the one
        // before it waits a moment for the rest (under a rush, buyers come
        // back in waves, and a wave that finds nothing in flight would send
        // its first few alone, each message costing RabbitMQ about what a
        // full one does). A buyer after a quiet spell never waits: the
        // batch before was as small.
        // (No batch is larger than batch_max_orders, so neither is the one
        // to match.) One timer for the whole wait; each wake takes all that
        // has arrived.
        if batch.len() < last_size && !gather.is_zero() {
            let deadline = tokio::time::sleep(gather);
            tokio::pin!(deadline);
            while batch.len() < last_size {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => batch.push(r),
                        None => break,
                    },
                    _ = &mut deadline => break,
                }
                take_waiting(&mut rx, &mut batch, cfg.batch_max_orders);
            }
        }
        last_size = batch.len();

        if publish(&*sink, batch, &current, &deps, &stats, permit, &doubtful)
            .await
            .is_err()
        {
            link.borrow_mut().take();
        }
    }

    // Shutting down: every batch in flight gets its confirm (or is in doubt).
    probe.abort();
    let _ = permits.acquire_many(max_batches as u32).await;
    release_queued(&mut rx, &stats, &doubtful);
    resolver.abort();
    // One more try for what is in doubt, then whatever is left is said.
    while !doubtful.is_empty() {
        if decide(&doubtful, &deps, &stats).await.is_err() {
            break;
        }
    }
    let left = doubtful.entries.borrow().len();
    if left > 0 {
        tracing::error!(
            in_doubt = left,
            "stopping with order-log entries in doubt and the store away: start-up recovery keeps the reservations the store has; payments and cancellations among them are lost"
        );
    }
    stats.connected.store(false, Ordering::Release);
    let last = link.borrow_mut().take();
    if let Some(l) = last {
        sink.close(&l).await;
    }
}

/// Moves the entries waiting in the channel into `batch`, up to `most`.
fn take_waiting(
    rx: &mut mpsc::Receiver<PublishRequest>,
    batch: &mut Vec<PublishRequest>,
    most: usize,
) {
    while batch.len() < most {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// Samples the sink's backlog about once a second for admission control
/// and the resolver, beside the publish loop: the loop never waits for the
/// broker's answer. A probe that fails marks the link stalled, and the
/// loop opens it again.
async fn probe_backlog<S: Sink>(
    sink: Rc<S>,
    link: Rc<RefCell<Option<Rc<S::Link>>>>,
    stats: Arc<PublisherStats>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(current) = link.borrow().clone() else {
            continue;
        };
        match sink.backlog(&current).await {
            Ok(d) => stats.queue_depth.store(d, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, "order log backlog unknown; opening the link again");
                stats.set_error(&e);
                stats.stalled.store(true, Ordering::Release);
            }
        }
    }
}

/// Appends one batch to the sink and spawns the wait for its confirm,
/// which holds `permit` (one of `orders.max_unconfirmed_batches`) until
/// then. `Err` when the link failed.
async fn publish<S: Sink>(
    sink: &S,
    batch: Vec<PublishRequest>,
    link: &S::Link,
    deps: &PublisherDeps,
    stats: &Arc<PublisherStats>,
    permit: tokio::sync::OwnedSemaphorePermit,
    doubtful: &Doubtful,
) -> Result<(), ()> {
    stats.unconfirmed_batches.fetch_add(1, Ordering::Relaxed);
    deps.metrics.batch_size.observe(batch.len() as f64);
    let entries: Vec<&LogEntry> = batch.iter().map(|r| &r.entry).collect();
    let started = Instant::now();
    let appended = sink.append(link, &entries).await;
    drop(entries);
    let which = sink.breaker();
    let stored = sink.confirms_into_store();
    match appended {
        Ok(confirm) => {
            let stats = stats.clone();
            let doubtful = doubtful.clone();
            let metrics = deps.metrics.clone();
            let breakers = deps.breakers.clone();
            let deadline = Duration::from_millis(deps.orders.confirm_timeout_ms.max(1));
            actix::spawn(async move {
                // A sink that takes the batch and never answers holds no
                // batch for ever: past the deadline the batch is in doubt
                // and the link is opened again.
                let outcome = match tokio::time::timeout(deadline, confirm).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        stats.stalled.store(true, Ordering::Release);
                        Err(format!("no confirm within {} ms", deadline.as_millis()))
                    }
                };
                drop(permit);
                stats.unconfirmed_batches.fetch_sub(1, Ordering::Relaxed);
                match outcome {
                    Ok(()) => {
                        which(&breakers).record_success();
                        metrics
                            .confirm_latency
                            .observe(started.elapsed().as_secs_f64());
                        stats
                            .last_confirm_us
                            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        stats.batches_confirmed.fetch_add(1, Ordering::Relaxed);
                        stats
                            .entries_confirmed
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        notify(&batch, |s| &mut s.confirmed, stored);
                    }
                    Err(reason) => {
                        tracing::error!(error = %reason, entries = batch.len(), "order-log batch not confirmed; its entries are in doubt");
                        which(&breakers).record_failure(&reason);
                        stats.set_error(&reason);
                        stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                        doubtful.add(batch, &stats);
                    }
                }
            });
            Ok(())
        }
        Err(e) => {
            drop(permit);
            stats.unconfirmed_batches.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(error = %e, entries = batch.len(), "order-log append failed; its entries are in doubt");
            which(&deps.breakers).record_failure(&e);
            stats.set_error(&e);
            stats.batches_failed.fetch_add(1, Ordering::Relaxed);
            doubtful.add(batch, stats);
            Err(())
        }
    }
}

/// Empties the channel of entries that were never handed to the sink:
/// reservations are released (nobody was told yes); transitions, decisions
/// their actors already applied, go to the resolver.
fn release_queued(
    rx: &mut mpsc::Receiver<PublishRequest>,
    stats: &PublisherStats,
    doubtful: &Doubtful,
) {
    let mut never_sent = Vec::new();
    let mut decided = Vec::new();
    while let Ok(r) = rx.try_recv() {
        if r.entry.is_transition() {
            decided.push(r);
        } else {
            never_sent.push(r);
        }
    }
    if !never_sent.is_empty() {
        stats
            .released
            .fetch_add(never_sent.len() as u64, Ordering::Relaxed);
        notify(&never_sent, |s| &mut s.released, false);
    }
    doubtful.add(decided, stats);
}

/// Entries one statement decides, at most.
const DECIDE_BATCH: usize = 4096;

/// Decides entries in doubt in the store, beside publishing: the publish
/// loop never waits for it. Waits while nothing is in doubt; backs off
/// while the store is away.
async fn resolve(doubtful: Doubtful, deps: Rc<PublisherDeps>, stats: Arc<PublisherStats>) {
    let initial = Duration::from_millis(deps.orders.retry_initial_ms.max(1));
    let mut backoff = initial;
    loop {
        if doubtful.is_empty() {
            doubtful.added.notified().await;
            continue;
        }
        // A reservation whose confirm was lost may still be on its way into
        // the store (services mode): give the writers a moment (bounded) to
        // put it there, so that it stands rather than being voided. Voiding would be safe
        // too: its buyer was told 503, and the void row stops a late copy.
        wait_writers_idle(&deps.writers, &stats, Duration::from_secs(2)).await;
        match decide(&doubtful, &deps, &stats).await {
            Ok(()) => backoff = initial,
            Err(()) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(deps.orders.retry_max_ms));
            }
        }
    }
}

/// Waits (at most `within`) until the last depth sample of the order queue
/// is zero and no writer holds a delivery.
async fn wait_writers_idle(writers: &WriterStats, stats: &PublisherStats, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if stats.queue_depth.load(Ordering::Relaxed) == 0
            && writers.in_flight.load(Ordering::Acquire) == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Decides one batch of entries in doubt with one statement each for the
/// transitions and the reservations. `Err` (entries put back) when
/// the store did not answer.
async fn decide(
    doubtful: &Doubtful,
    deps: &PublisherDeps,
    stats: &PublisherStats,
) -> Result<(), ()> {
    let batch = doubtful.take(DECIDE_BATCH);
    if batch.is_empty() {
        return Ok(());
    }
    let (transitions, reservations): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|r| r.entry.is_transition());
    if !transitions.is_empty() {
        let orders: Vec<_> = transitions.iter().map(|r| r.entry.order()).collect();
        match deps.store.write_orders(&orders).await {
            Ok(()) => {
                tracing::info!(
                    entries = transitions.len(),
                    "in-doubt transitions written to the store"
                );
                stats
                    .in_doubt
                    .fetch_sub(transitions.len(), Ordering::Relaxed);
                notify(&transitions, |s| &mut s.confirmed, true);
            }
            Err(e) => {
                tracing::warn!(error = %e, entries = transitions.len(), "cannot write in-doubt transitions yet");
                doubtful.put_back(transitions);
                doubtful.put_back(reservations);
                return Err(());
            }
        }
    }
    if reservations.is_empty() {
        return Ok(());
    }
    let orders: Vec<_> = reservations.iter().map(|r| r.entry.order()).collect();
    match deps.store.void_absent(&orders).await {
        Ok(voided) => {
            let voided: std::collections::HashSet<Uuid> = voided.into_iter().collect();
            let (released, kept): (Vec<_>, Vec<_>) = reservations
                .into_iter()
                .partition(|r| voided.contains(&r.entry.order_id()));
            tracing::info!(
                kept = kept.len(),
                released = released.len(),
                "in-doubt reservations decided"
            );
            stats
                .in_doubt
                .fetch_sub(kept.len() + released.len(), Ordering::Relaxed);
            stats
                .released
                .fetch_add(released.len() as u64, Ordering::Relaxed);
            notify(&kept, |s| &mut s.confirmed, true);
            notify(&released, |s| &mut s.released, true);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, entries = reservations.len(), "cannot decide in-doubt reservations yet");
            doubtful.put_back(reservations);
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use actix::prelude::*;
    use chrono::Utc;
    use tokio::sync::Semaphore;
    use uuid::Uuid;

    use super::*;
    use crate::config::{Overrides, Settings, StorageMode};
    use crate::domain::order::Order;

    /// A sink that records the size of every batch appended and confirms
    /// each only when the test opens its gate.
    struct GatedSink {
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: Arc<Semaphore>,
    }

    impl Sink for GatedSink {
        type Link = ();

        fn name(&self) -> &'static str {
            "gated"
        }

        fn breaker(&self) -> fn(&Breakers) -> &CircuitBreaker {
            |b| &b.sqlite
        }

        async fn open(&self) -> Result<(), String> {
            Ok(())
        }

        fn is_open(&self, _: &()) -> bool {
            true
        }

        async fn backlog(&self, _: &()) -> Result<u32, String> {
            Ok(0)
        }

        async fn append(&self, _: &(), entries: &[&LogEntry]) -> Result<Confirm, String> {
            if let Ok(mut sizes) = self.sizes.lock() {
                sizes.push(entries.len());
            }
            let gate = self.gate.clone();
            Ok(Box::pin(async move {
                gate.acquire()
                    .await
                    .map(|p| p.forget())
                    .map_err(|e| e.to_string())
            }))
        }

        fn confirms_into_store(&self) -> bool {
            true
        }

        async fn close(&self, _: &()) {}
    }

    /// Collects what the publisher confirms, as a stock actor would.
    struct Told(Arc<Mutex<Vec<Uuid>>>);

    impl Actor for Told {
        type Context = Context<Self>;
    }

    impl Handler<Settled> for Told {
        type Result = ();

        fn handle(&mut self, msg: Settled, _: &mut Self::Context) {
            if let Ok(mut told) = self.0.lock() {
                told.extend(msg.confirmed);
            }
        }
    }

    fn reservation(sale_id: Uuid) -> LogEntry {
        let order = Order::test_reservation(Uuid::now_v7(), sale_id, Uuid::new_v4(), Utc::now());
        LogEntry::Reserve { order }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// A publisher over a [`GatedSink`] with `places` batches in flight at
    /// most, `delay` for a batch to fill while others are in flight and
    /// `gather` for one to reach its predecessor's size, and a stock
    /// actor's stand-in that collects what it is told.
    struct Gated {
        publisher: OrderPublisher,
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: Arc<Semaphore>,
        told: Arc<Mutex<Vec<Uuid>>>,
        notify: Arc<WeakRecipient<Settled>>,
        _teller: Addr<Told>,
        sale_id: Uuid,
        dir: std::path::PathBuf,
    }

    impl Gated {
        async fn start(places: usize, delay: Duration, gather: Duration) -> Gated {
            let mut settings = Settings::load_without_env(None, &Overrides::default())
                .unwrap_or_else(|e| panic!("{e}"));
            settings.orders.max_unconfirmed_batches = places;
            settings.orders.batch_max_delay_us = delay.as_micros() as u64;
            settings.orders.batch_gather_us = gather.as_micros() as u64;
            let dir = std::env::temp_dir().join(format!("flashsale-sink-{}", Uuid::new_v4()));
            settings.storage.path = dir.join("store.db");
            let store = SqliteStore::open(&settings.storage)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let deps = PublisherDeps {
                orders: settings.orders.clone(),
                store: Arc::new(store),
                writers: Arc::default(),
                metrics: crate::metrics::Metrics::register(&mut Default::default()),
                breakers: Arc::new(Breakers::new(
                    5,
                    Duration::from_secs(1),
                    StorageMode::Embedded,
                )),
            };
            let sizes = Arc::new(Mutex::new(Vec::new()));
            let gate = Arc::new(Semaphore::new(0));
            let sink = GatedSink {
                sizes: sizes.clone(),
                gate: gate.clone(),
            };
            let (publisher, _stopped) =
                OrderPublisher::start(&actix::Arbiter::current(), sink, deps);
            until("the publisher to open its sink", || publisher.is_up()).await;
            let told = Arc::new(Mutex::new(Vec::new()));
            // The publisher holds the actor weakly, as it does a stock actor.
            let teller = Told(told.clone()).start();
            Gated {
                publisher,
                sizes,
                gate,
                told,
                notify: Arc::new(teller.downgrade().recipient()),
                _teller: teller,
                sale_id: Uuid::now_v7(),
                dir,
            }
        }

        fn publish(&self) {
            self.publisher
                .try_publish(PublishRequest {
                    entry: reservation(self.sale_id),
                    sale_id: self.sale_id,
                    notify: self.notify.clone(),
                })
                .unwrap_or_else(|e| panic!("{e:?}"));
        }

        /// Publishes each wave's entries at once, then lets the publisher
        /// run for a moment before the next.
        async fn publish_in_waves(&self, waves: &[usize]) {
            for &n in waves {
                for _ in 0..n {
                    self.publish();
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }

        fn appended(&self) -> Vec<usize> {
            self.sizes.lock().map(|s| s.clone()).unwrap_or_default()
        }

        fn told(&self) -> usize {
            self.told.lock().map(|t| t.len()).unwrap_or(0)
        }

        fn stop(self) {
            self.publisher.shutdown();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[actix_web::test]
    async fn a_batch_formed_while_the_sink_is_busy_takes_every_entry_that_waited() {
        let log = Gated::start(1, Duration::ZERO, Duration::ZERO).await;
        // One batch in flight takes the one place.
        log.publish();
        until("the first batch", || log.appended() == vec![1]).await;
        // What arrives meanwhile, in two waves, waits for the place rather
        // than forming batches of its own behind it.
        log.publish_in_waves(&[20, 20]).await;
        assert_eq!(
            log.appended(),
            vec![1],
            "nothing more is appended while the place is taken"
        );
        // The first confirm frees the place: the next batch takes all 40.
        log.gate.add_permits(1);
        until("the second batch", || log.appended().len() == 2).await;
        assert_eq!(log.appended(), vec![1, 40]);
        log.gate.add_permits(1);
        until("every entry confirmed", || log.told() == 41).await;
        log.stop();
    }

    #[actix_web::test]
    async fn a_batch_waits_for_more_only_until_the_batches_before_it_are_confirmed() {
        // Two places, and a delay far longer than the test.
        let log = Gated::start(2, Duration::from_secs(30), Duration::ZERO).await;
        // Nothing in flight: the first entry goes at once.
        log.publish();
        until("the first batch", || log.appended() == vec![1]).await;
        // With the first unconfirmed, the next batch takes the second place
        // and waits for more.
        log.publish_in_waves(&[5, 3]).await;
        assert_eq!(
            log.appended(),
            vec![1],
            "the batch waits while the first is unconfirmed"
        );
        // The first confirm ends the wait: the batch goes with everything
        // that came meanwhile, not after the delay.
        log.gate.add_permits(1);
        until("the second batch", || log.appended().len() == 2).await;
        assert_eq!(log.appended(), vec![1, 8]);
        log.gate.add_permits(1);
        until("every entry confirmed", || log.told() == 9).await;
        log.stop();
    }

    #[actix_web::test]
    async fn a_batch_smaller_than_the_one_before_waits_for_more_only_until_the_gather_ends() {
        let gather = Duration::from_millis(600);
        let log = Gated::start(2, Duration::ZERO, gather).await;
        // The first batch has no predecessor to match: it goes at once.
        log.publish_in_waves(&[4]).await;
        until("the first batch", || log.appended() == vec![4]).await;
        log.gate.add_permits(1);
        until("the first confirm", || log.told() == 4).await;
        // Nothing in flight, yet one entry does not go alone after a batch
        // of four: it waits for the wave behind it...
        log.publish_in_waves(&[1, 2]).await;
        assert_eq!(log.appended(), vec![4], "three of four wait for the fourth");
        // ...and goes as soon as it holds as many as the batch before.
        log.publish_in_waves(&[1]).await;
        until("the second batch", || log.appended().len() == 2).await;
        assert_eq!(log.appended(), vec![4, 4]);
        log.gate.add_permits(1);
        until("the second confirm", || log.told() == 8).await;
        // A buyer with no wave behind waits no longer than the gather...
        let alone = std::time::Instant::now();
        log.publish();
        until("the lone batch", || log.appended().len() == 3).await;
        assert!(alone.elapsed() >= gather, "it waited for the gather");
        log.gate.add_permits(1);
        // ...and the next lone buyer, after a batch of one, not at all.
        let next = std::time::Instant::now();
        log.publish();
        until("the next lone batch", || log.appended().len() == 4).await;
        assert!(
            next.elapsed() < gather,
            "a batch as large as the last goes at once"
        );
        assert_eq!(log.appended(), vec![4, 4, 1, 1]);
        log.gate.add_permits(1);
        until("every entry confirmed", || log.told() == 10).await;
        log.stop();
    }
}
