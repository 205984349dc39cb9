//! `OrderPublisher`: group commit of order-log entries into RabbitMQ.
//!
//! Stock actors hand entries over a bounded channel (`try_publish`: a full
//! channel is an explicit "overloaded", never a wait). One task collects
//! them into batches (up to `orders.batch_max_orders`, waiting at most
//! `orders.batch_max_delay_us` for more while earlier batches are still
//! unconfirmed), publishes each batch as one persistent message on a channel
//! in confirm mode, and keeps up to `orders.max_unconfirmed_batches` in
//! flight. When a batch's confirm arrives, every sale in it is told with one
//! [`Settled`] message; that is when shoppers get their 201.
//!
//! Failures never oversell and never acknowledge what is not durable:
//! - entries that were never handed to the broker (no connection) are
//!   `released` at once;
//! - entries whose publish or confirm failed are `in_doubt`: their units stay
//!   held until, with the broker back and the queue drained into PostgreSQL,
//!   each is decided there (`Database::void_if_absent`): kept if PostgreSQL
//!   has it, released (and voided, so no late copy can land) if not.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakRecipient;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{mpsc, watch, Semaphore};
use uuid::Uuid;

use super::order_log::{encode, LogEntry};
use super::postgres::Database;
use super::rabbit;
use crate::actors::order_writer::{wait_drained, WriterStats};
use crate::config::{OrderSettings, RabbitSettings};

/// The outcome of published entries, sent to the stock actor of their sale.
#[derive(Debug, Default, Message)]
#[rtype(result = "()")]
pub struct Settled {
    /// Durable: in RabbitMQ (confirmed) or found in PostgreSQL.
    pub confirmed: Vec<Uuid>,
    /// Publish failed with the outcome unknown; decided later.
    pub in_doubt: Vec<Uuid>,
    /// Not durable and never will be: give the units back.
    pub released: Vec<Uuid>,
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
    /// No broker connection, or shutting down.
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
    pub rabbit: RabbitSettings,
    pub orders: OrderSettings,
    pub db: Database,
    pub writers: Arc<WriterStats>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub breakers: Arc<crate::breaker::Breakers>,
}

impl OrderPublisher {
    /// Starts the publisher task on `arbiter` (its broker connection lives
    /// there too). The returned receiver resolves when the publisher has
    /// stopped (after [`Self::shutdown`]).
    pub fn start(
        arbiter: &actix::ArbiterHandle,
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
                run(rx, stop_rx, deps, task_stats).await;
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

struct Link {
    conn: Connection,
    channel: Channel,
}

async fn connect_link(settings: &RabbitSettings) -> Result<Link, String> {
    let (conn, channel) = rabbit::open(settings, "flashsale-publisher")
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Link { conn, channel })
}

/// Tells each sale in `reqs` its outcome, one message per sale.
fn notify<'a>(
    reqs: impl IntoIterator<Item = &'a PublishRequest>,
    outcome: fn(&mut Settled) -> &mut Vec<Uuid>,
) {
    let mut by_sale: HashMap<Uuid, (&WeakRecipient<Settled>, Settled)> = HashMap::new();
    for req in reqs {
        let slot = by_sale
            .entry(req.sale_id)
            .or_insert_with(|| (&req.notify, Settled::default()));
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

type Pending = Rc<RefCell<Vec<PublishRequest>>>;

async fn run(
    mut rx: mpsc::Receiver<PublishRequest>,
    mut stop: watch::Receiver<bool>,
    deps: PublisherDeps,
    stats: Arc<PublisherStats>,
) {
    let cfg = &deps.orders;
    let max_batches = cfg.max_unconfirmed_batches;
    let permits = Arc::new(Semaphore::new(max_batches));
    let in_doubt: Pending = Rc::new(RefCell::new(Vec::new()));
    let mut link: Option<Link> = None;
    let initial_backoff = Duration::from_millis(cfg.reconnect_initial_ms.max(1));
    let mut backoff = initial_backoff;
    let max_delay = Duration::from_micros(cfg.batch_max_delay_us);
    let mut depth_sampled = Instant::now() - Duration::from_secs(10);

    loop {
        let stopping = *stop.borrow();
        if link
            .as_ref()
            .is_none_or(|l| !l.channel.status().connected())
        {
            stats.connected.store(false, Ordering::Release);
            if let Some(old) = link.take() {
                let _ = old.conn.close(200, "reconnecting".into()).await;
            }
            if stopping {
                break;
            }
            match connect_link(&deps.rabbit).await {
                Ok(l) => {
                    tracing::info!("order publisher connected to RabbitMQ");
                    deps.breakers.rabbitmq.record_success();
                    link = Some(l);
                    backoff = initial_backoff;
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    stats.connected.store(true, Ordering::Release);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "order publisher cannot reach RabbitMQ");
                    deps.breakers.rabbitmq.record_failure(&e);
                    stats.set_error(&e);
                    // Whatever waits now was never handed to the broker.
                    release_queued(&mut rx, &stats);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(cfg.reconnect_max_ms));
                    continue;
                }
            }
        }
        let Some(current) = link.as_ref() else {
            continue;
        };
        if depth_sampled.elapsed() >= Duration::from_secs(1) {
            depth_sampled = Instant::now();
            if let Ok(d) = rabbit::queue_depth(&current.channel, &deps.rabbit.queue).await {
                stats.queue_depth.store(d, Ordering::Relaxed);
            }
        }

        if !in_doubt.borrow().is_empty()
            && !stopping
            && resolve_in_doubt(&in_doubt, current, &deps, &stats, &permits)
                .await
                .is_err()
        {
            link = None;
            continue;
        }

        // Wait for the first entry of a batch (or a reason to look around).
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.changed(), if !stopping => continue,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if stopping && rx.is_empty() { break; }
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        // Group commit: wait for more only while earlier batches are in flight.
        let wait = permits.available_permits() < max_batches && !max_delay.is_zero();
        if wait {
            // Sleep without polling the channel: senders then do not wake
            // this task once per entry, and the batch fills meanwhile.
            tokio::time::sleep(max_delay).await;
        }
        while batch.len() < cfg.batch_max_orders {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }

        if publish(batch, current, &deps, &stats, &permits, &in_doubt)
            .await
            .is_err()
        {
            link = None;
        }
    }

    // Shutting down: every batch in flight gets its confirm (or is in doubt).
    let _ = permits.acquire_many(max_batches as u32).await;
    release_queued(&mut rx, &stats);
    let left = in_doubt.borrow().len();
    if left > 0 {
        tracing::warn!(
            in_doubt = left,
            "stopping with orders in doubt; start-up recovery decides them from PostgreSQL"
        );
    }
    stats.connected.store(false, Ordering::Release);
    if let Some(l) = link {
        let _ = l.conn.close(200, "shutdown".into()).await;
    }
}

/// Publishes one batch as one persistent message and spawns the wait for its
/// confirm (bounded by the permits). `Err` when the channel failed.
async fn publish(
    batch: Vec<PublishRequest>,
    link: &Link,
    deps: &PublisherDeps,
    stats: &Arc<PublisherStats>,
    permits: &Arc<Semaphore>,
    in_doubt: &Pending,
) -> Result<(), ()> {
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return Err(());
    };
    stats.unconfirmed_batches.fetch_add(1, Ordering::Relaxed);
    deps.metrics.batch_size.observe(batch.len() as f64);
    let entries: Vec<&LogEntry> = batch.iter().map(|r| &r.entry).collect();
    let payload = encode(&entries);
    let started = Instant::now();
    let published = link
        .channel
        .basic_publish(
            "".into(),
            deps.rabbit.queue.as_str().into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await;
    match published {
        Ok(confirm) => {
            let stats = stats.clone();
            let in_doubt = in_doubt.clone();
            let metrics = deps.metrics.clone();
            let breakers = deps.breakers.clone();
            actix::spawn(async move {
                let outcome = confirm.await;
                drop(permit);
                stats.unconfirmed_batches.fetch_sub(1, Ordering::Relaxed);
                match outcome {
                    Ok(c) if c.is_ack() => {
                        breakers.rabbitmq.record_success();
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
                        notify(&batch, |s| &mut s.confirmed);
                    }
                    other => {
                        let reason = match other {
                            Ok(_) => "negative confirm".to_owned(),
                            Err(e) => e.to_string(),
                        };
                        tracing::error!(error = %reason, entries = batch.len(), "order-log batch not confirmed; its entries are in doubt");
                        breakers.rabbitmq.record_failure(&reason);
                        stats.set_error(&reason);
                        mark_in_doubt(batch, &in_doubt, &stats);
                    }
                }
            });
            Ok(())
        }
        Err(e) => {
            drop(permit);
            stats.unconfirmed_batches.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(error = %e, entries = batch.len(), "order-log publish failed; its entries are in doubt");
            deps.breakers.rabbitmq.record_failure(&e);
            stats.set_error(&e);
            mark_in_doubt(batch, in_doubt, stats);
            Err(())
        }
    }
}

fn mark_in_doubt(batch: Vec<PublishRequest>, pending: &Pending, stats: &PublisherStats) {
    stats.batches_failed.fetch_add(1, Ordering::Relaxed);
    stats.in_doubt.fetch_add(batch.len(), Ordering::Relaxed);
    notify(&batch, |s| &mut s.in_doubt);
    pending.borrow_mut().extend(batch);
}

fn release_queued(rx: &mut mpsc::Receiver<PublishRequest>, stats: &PublisherStats) {
    let mut never_sent = Vec::new();
    while let Ok(r) = rx.try_recv() {
        never_sent.push(r);
    }
    if !never_sent.is_empty() {
        stats
            .released
            .fetch_add(never_sent.len() as u64, Ordering::Relaxed);
        notify(&never_sent, |s| &mut s.released);
    }
}

/// With the broker back. Transitions (payments, cancellations, expiries)
/// were decided by their actor and are idempotent: they are published again.
/// Reservations are decided in PostgreSQL once the queue has drained into
/// it: kept if there, voided and released if not. Undecided ones (database
/// down) wait for the next round.
async fn resolve_in_doubt(
    pending: &Pending,
    link: &Link,
    deps: &PublisherDeps,
    stats: &Arc<PublisherStats>,
    permits: &Arc<Semaphore>,
) -> Result<(), ()> {
    let (transitions, reservations): (Vec<_>, Vec<_>) = std::mem::take(&mut *pending.borrow_mut())
        .into_iter()
        .partition(|r| matches!(r.entry, LogEntry::Transition { .. }));
    if !transitions.is_empty() {
        stats
            .in_doubt
            .fetch_sub(transitions.len(), Ordering::Relaxed);
        tracing::info!(
            entries = transitions.len(),
            "publishing in-doubt transitions again"
        );
        publish(transitions, link, deps, stats, permits, pending).await?;
    }
    if reservations.is_empty() {
        return Ok(());
    }
    pending.borrow_mut().extend(reservations);
    if !wait_drained(
        &link.channel,
        &deps.rabbit.queue,
        &deps.writers,
        Duration::from_secs(5),
    )
    .await
    {
        return Ok(());
    }
    let list: Vec<PublishRequest> = std::mem::take(&mut *pending.borrow_mut());
    let mut kept = Vec::new();
    let mut released = Vec::new();
    let mut undecided = Vec::new();
    for req in list {
        let order = req.entry.order();
        match deps.db.void_if_absent(order).await {
            Ok(true) => released.push(req),
            Ok(false) => kept.push(req),
            Err(e) => {
                tracing::warn!(error = %e, order_id = %order.id, "cannot decide an in-doubt order yet");
                undecided.push(req);
            }
        }
    }
    let decided = kept.len() + released.len();
    if decided > 0 {
        tracing::info!(
            kept = kept.len(),
            released = released.len(),
            "in-doubt orders decided"
        );
    }
    stats.in_doubt.fetch_sub(decided, Ordering::Relaxed);
    stats
        .released
        .fetch_add(released.len() as u64, Ordering::Relaxed);
    notify(&kept, |s| &mut s.confirmed);
    notify(&released, |s| &mut s.released);
    pending.borrow_mut().extend(undecided);
    Ok(())
}
