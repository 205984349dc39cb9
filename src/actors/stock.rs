//! `StockActor`: the one owner of a sale's stock.
//!
//! It holds a [`SaleBook`] and applies every decision to it in mailbox order:
//! reserve, pay, cancel, expire (on a timer, from the book's ordered
//! deadlines), settle what the order log confirmed, apply admin changes.
//! Every decision is published to the [`OrderPublisher`] before it counts,
//! and whoever asked is answered only when the entry is confirmed.
//!
//! An actor starts *closed* while start-up recovery drains the order log
//! (its book then holds what PostgreSQL had, for reads only): it takes no
//! purchase, payment, cancellation, expiry or admin change until
//! [`Reopen`] hands it the book rebuilt from the whole log.
//! After each change it publishes hints for the HTTP workers
//! ([`SaleShared`]) and, at most every `stock.snapshot_interval_ms`, a
//! snapshot to Redis that never holds up a purchase.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix::WeakRecipient;
use chrono::Utc;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::registry::{KeyUse, SaleHandle, SaleRegistry, SaleShared};
use crate::domain::order::Order;
use crate::domain::sale::{PatchError, Sale, SalePatch, SaleView, TransitionError};
use crate::domain::sale_book::{
    Action, ActionRefused, Durability, Plan, Rejection, Reserved, SaleBook,
};
use crate::order_log::sink::{OrderPublisher, PublishRefused, PublishRequest, Settled};
use crate::order_log::LogEntry;
use crate::persistence::redis::RedisStore;
use crate::persistence::store::{SharedStore, StoreError};

/// The answer to a purchase.
#[derive(Debug)]
pub enum PurchaseReply {
    /// A new order, now durable (HTTP 201): the copy the order directory
    /// keeps too.
    Created(Arc<Order>),
    /// The order this idempotency key made before, durable (HTTP 200).
    Replayed(Order),
    /// The order this idempotency key made before, settled and no longer
    /// kept by the actor or the directory: read it from the store (HTTP 200).
    ReplayedStored(Uuid),
    /// Refused by a rule (HTTP 409).
    Rejected(Rejection),
    /// Too much waits already; nothing was reserved (HTTP 503 overloaded).
    Overloaded,
    /// The order log cannot take it now, or its fate is not known yet
    /// (HTTP 503 unavailable). Nothing was acknowledged.
    Unavailable,
}

/// Asks to reserve `quantity` units for a user. Sent with `try_send`: a full
/// mailbox is answered 503 at once. The answer comes on `reply`, possibly
/// much later (after the order log confirms).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reserve {
    pub user_id: Uuid,
    pub quantity: u32,
    pub idempotency_key: Option<String>,
    pub reply: oneshot::Sender<PurchaseReply>,
    /// The request's span: the actor's work is logged inside it.
    pub span: tracing::Span,
}

/// The purchases of one sale that an HTTP worker took in during one turn of
/// its event loop, handed over together: the pipeline thread is woken once
/// for them, not once each. Each took its mailbox slot on its own.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReserveBatch(pub Vec<Reserve>);

/// The answer to a payment or cancellation.
#[derive(Debug)]
pub enum ActionReply {
    /// The order in its durable state; `changed` is false when it already
    /// was in the asked-for state (a repeated call).
    Done {
        order: Order,
        changed: bool,
    },
    Refused(ActionRefused),
    Overloaded,
    Unavailable,
}

/// Asks to pay or cancel an order of this sale on behalf of its owner.
/// Sent with `try_send` like [`Reserve`]; answered on `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OrderAction {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub action: Action,
    pub reply: oneshot::Sender<ActionReply>,
    /// The request's span: the actor's work is logged inside it.
    pub span: tracing::Span,
}

/// An admin change to the sale's definition.
#[derive(Debug, Clone)]
pub enum SaleChange {
    Patch(SalePatch),
    Pause(bool),
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sale is closed while recovery drains the order log.
    #[error("the sale is recovering")]
    Recovering,
}

/// Opens a sale closed for recovery, once the order log has drained into
/// PostgreSQL: `book` (rebuilt from PostgreSQL) replaces the one read at
/// start; `None` when the drain found nothing, so the book read at start holds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reopen {
    pub book: Option<SaleBook>,
}

/// Applies an admin change: validated against the units orders hold, written
/// to PostgreSQL, then applied, with no purchase decided in between.
#[derive(Message)]
#[rtype(result = "Result<Sale, ChangeError>")]
pub struct ChangeSale(pub SaleChange);

/// Who waits for an order's latest change to be confirmed.
enum Waiter {
    /// A purchase: `original` made the order, the others replay its key.
    Purchase {
        reply: oneshot::Sender<PurchaseReply>,
        original: bool,
    },
    /// A payment or cancellation (`changed`: this call made the change).
    Action {
        reply: oneshot::Sender<ActionReply>,
        changed: bool,
    },
}

/// How the waiters of an order are answered.
#[derive(Clone, Copy)]
enum Outcome {
    Confirmed,
    Unavailable,
}

pub struct StockActor {
    book: SaleBook,
    shared: Arc<SaleShared>,
    registry: Arc<SaleRegistry>,
    publisher: OrderPublisher,
    store: SharedStore,
    /// Where snapshots go (services mode) and the sale's key there, made
    /// once; `None`: no snapshots.
    snapshots: Option<(RedisStore, Arc<str>)>,
    snapshot_interval: Duration,
    expiry_tick: Duration,
    breakers: Arc<crate::breaker::Breakers>,
    idle_stop_after: Duration,
    publish_interval: Duration,
    /// When a purchase, action or change last reached the actor.
    last_asked: std::time::Instant,
    snapshot_in_flight: bool,
    /// False while recovery drains the order log: nothing is decided.
    open: bool,
    /// Who waits for each order's confirm: an insert and a removal per
    /// durable purchase, hashed with foldhash rather than SipHash.
    waiters: HashMap<Uuid, Vec<Waiter>, foldhash::quality::RandomState>,
    /// Where the publisher reports outcomes: made once, shared by every
    /// entry (a fresh `Recipient` per entry allocated on the hot path), and
    /// weak so that it does not keep the actor alive.
    settle_to: Arc<WeakRecipient<Settled>>,
}

/// What a stock actor needs besides its book.
#[derive(Clone)]
pub struct StockDeps {
    pub registry: Arc<SaleRegistry>,
    pub publisher: OrderPublisher,
    pub store: SharedStore,
    /// Redis, for snapshots in services mode; `None` in embedded mode,
    /// where readers have the registry's hints and `/admin/v1/actors`.
    pub snapshots: Option<RedisStore>,
    pub mailbox_capacity: usize,
    pub snapshot_interval: Duration,
    /// How often due reservations are looked for.
    pub expiry_tick: Duration,
    /// How long after its sale ended an actor with nothing in play stops.
    pub idle_stop_after: Duration,
    /// Shortest time between two published states of a sale (event streams).
    pub publish_interval: Duration,
    pub breakers: Arc<crate::breaker::Breakers>,
    /// Where stock actors run: one arbiter for all of them, not the HTTP
    /// workers' (those stop first at shutdown, while orders still settle).
    pub arbiter: actix::ArbiterHandle,
}

impl StockActor {
    /// Starts the actor for `book` on the stock arbiter and registers it;
    /// `open: false` starts it closed until [`Reopen`].
    pub fn launch(book: SaleBook, deps: &StockDeps, open: bool) -> Arc<SaleHandle> {
        let shared = Arc::new(SaleShared::new(
            &book,
            deps.mailbox_capacity,
            deps.registry.catalogue.clone(),
        ));
        let sale_id = book.sale().id;
        record_keys(&book, &deps.registry);
        let addr = Self::start(book, shared.clone(), deps, open);
        deps.registry.insert(sale_id, SaleHandle::new(addr, shared))
    }

    fn start(
        book: SaleBook,
        shared: Arc<SaleShared>,
        deps: &StockDeps,
        open: bool,
    ) -> Addr<StockActor> {
        let owned = deps.clone();
        let sale_id = book.sale().id;
        let snapshots = owned.snapshots.map(|redis| {
            let key = redis.key(&format!("sale:{sale_id}"));
            (redis, Arc::from(key))
        });
        StockActor::start_in_arbiter(&deps.arbiter, move |ctx| {
            ctx.set_mailbox_capacity(owned.mailbox_capacity);
            StockActor {
                book,
                shared,
                registry: owned.registry,
                publisher: owned.publisher,
                store: owned.store,
                snapshots,
                snapshot_interval: owned.snapshot_interval,
                expiry_tick: owned.expiry_tick,
                breakers: owned.breakers,
                idle_stop_after: owned.idle_stop_after,
                publish_interval: owned.publish_interval,
                last_asked: std::time::Instant::now(),
                snapshot_in_flight: false,
                open,
                waiters: HashMap::default(),
                settle_to: Arc::new(ctx.address().downgrade().recipient()),
            }
        })
    }

    /// The sale's running actor, started again (its book read from
    /// PostgreSQL) if it had stopped: one start serves every caller.
    pub async fn running(
        handle: &SaleHandle,
        deps: &StockDeps,
    ) -> Result<Addr<StockActor>, StoreError> {
        if let Some(addr) = handle.addr().filter(Addr::connected) {
            return Ok(addr);
        }
        let _one_start = handle.waking.lock().await;
        if let Some(addr) = handle.addr().filter(Addr::connected) {
            return Ok(addr);
        }
        let sale = handle.shared.sale().as_ref().clone();
        let book = deps.store.restore_book(sale).await?;
        handle.shared.publish_stock(&book);
        record_keys(&book, &deps.registry);
        let addr = Self::start(book, handle.shared.clone(), deps, true);
        handle.attach(addr.clone());
        tracing::info!(sale_id = %handle.shared.sale().id, "stock actor started again");
        Ok(addr)
    }

    /// Stops the actor once its sale ended and nobody asked anything of it
    /// for `idle_stop_after`, with nothing in play: no reservation, no change
    /// waiting for the order log, no snapshot behind, no message on its way.
    /// Its hints stay.
    fn stop_if_idle(&mut self, ctx: &mut Context<Self>) {
        let ended = self.book.sale().spec.ends_at;
        let grace =
            chrono::Duration::from_std(self.idle_stop_after).unwrap_or(chrono::Duration::MAX);
        if !self.open
            || Utc::now() < ended + grace
            || self.last_asked.elapsed() < self.idle_stop_after
            || self.book.orders_in_play() > 0
            || !self.waiters.is_empty()
            || self.snapshot_in_flight
        {
            return;
        }
        let Some(handle) = self.registry.get(self.book.sale().id) else {
            return;
        };
        self.publish_view();
        if handle.detach_if_idle() {
            tracing::info!(sale_id = %self.book.sale().id, "stock actor stopped: its sale ended");
            ctx.stop();
        }
    }

    fn changed(&mut self) {
        self.shared.publish_stock(&self.book);
    }

    /// Publishes the sale's public view for event streams if its state or
    /// its status (which also moves with the clock) changed since the last.
    fn publish_view(&self) {
        let now = Utc::now();
        let status = self.book.status(now);
        let view = || SaleView::new(self.book.sale(), i64::from(self.book.stock_left()), now);
        self.shared
            .feed
            .publish_if_changed(view, status, self.book.version());
    }

    /// Answers everyone waiting on order `id` (`order`: as now confirmed).
    fn answer(&mut self, id: Uuid, order: Option<&Arc<Order>>, outcome: Outcome) {
        let Some(waiters) = self.waiters.remove(&id) else {
            return;
        };
        for w in waiters {
            match (w, order, outcome) {
                (Waiter::Purchase { reply, original }, Some(o), Outcome::Confirmed) => {
                    let _ = reply.send(if original {
                        PurchaseReply::Created(o.clone())
                    } else {
                        PurchaseReply::Replayed(o.as_ref().clone())
                    });
                }
                (Waiter::Action { reply, changed }, Some(o), Outcome::Confirmed) => {
                    let _ = reply.send(ActionReply::Done {
                        order: o.as_ref().clone(),
                        changed,
                    });
                }
                (Waiter::Purchase { reply, .. }, _, _) => {
                    let _ = reply.send(PurchaseReply::Unavailable);
                }
                (Waiter::Action { reply, .. }, _, _) => {
                    let _ = reply.send(ActionReply::Unavailable);
                }
            }
        }
    }

    fn publish(&self, entry: LogEntry) -> Result<(), PublishRefused> {
        self.publisher.try_publish(PublishRequest {
            sale_id: self.book.sale().id,
            entry,
            notify: self.settle_to.clone(),
        })
    }

    /// Expires every durable reservation past its deadline. Each expiry is
    /// published first; one the log cannot take now is tried at the next tick.
    fn expire_due(&mut self) {
        if !self.open {
            return;
        }
        let due = self.book.due(Utc::now(), 4096);
        if due.is_empty() {
            return;
        }
        for order in due {
            match self.publish(LogEntry::Transition {
                order: order.clone(),
            }) {
                Ok(()) => self.book.apply_change(order),
                Err(_) => break,
            }
        }
        self.changed();
    }

    fn snapshot(&mut self, ctx: &mut Context<Self>) {
        let version = self.book.version();
        if !self.open
            || self.snapshot_in_flight
            || version == self.shared.snapshot_version.load(Ordering::Relaxed)
        {
            return;
        }
        // No snapshots in this mode; or Redis down: snapshots pause (the
        // breaker lets one through now and then). Purchases never wait.
        let Some((redis, key)) = self.snapshots.clone() else {
            return;
        };
        if !self.breakers.redis.allow() {
            return;
        }
        self.snapshot_in_flight = true;
        let c = self.book.counters();
        let now = Utc::now();
        let fields = [
            ("stock_left", self.book.stock_left().to_string()),
            ("stock_total", self.book.sale().spec.stock_total.to_string()),
            ("reserved", c.reserved.to_string()),
            ("paid", c.paid.to_string()),
            ("expired", c.expired.to_string()),
            ("cancelled", c.cancelled.to_string()),
            (
                "status",
                format!("{:?}", self.book.status(now)).to_lowercase(),
            ),
            ("version", version.to_string()),
            ("updated_at", now.to_rfc3339()),
        ];
        ctx.spawn(
            async move { redis.write_hash(&key, &fields).await }
                .into_actor(self)
                .map(move |res, act, _| {
                    act.snapshot_in_flight = false;
                    match res {
                        Ok(()) => {
                            act.breakers.redis.record_success();
                            act.shared
                                .snapshot_version
                                .store(version, Ordering::Relaxed);
                            act.shared
                                .snapshot_at_ms
                                .store(now.timestamp_millis(), Ordering::Relaxed);
                        }
                        Err(e) => {
                            act.breakers.redis.record_failure(&e);
                            act.shared.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "redis snapshot failed");
                        }
                    }
                }),
        );
    }
}

impl Actor for StockActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.snapshot_interval, |act, ctx| act.snapshot(ctx));
        ctx.run_interval(self.publish_interval, |act, _| act.publish_view());
        ctx.run_interval(self.expiry_tick, |act, ctx| {
            act.expire_due();
            act.stop_if_idle(ctx);
        });
        self.snapshot(ctx);
        self.expire_due();
    }
}

impl Handler<Reserve> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: Reserve, _: &mut Self::Context) {
        self.shared.leave();
        self.last_asked = std::time::Instant::now();
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
        let Reserve {
            user_id,
            quantity,
            idempotency_key,
            reply,
            span,
        } = msg;
        let sale_id = self.book.sale().id;
        // Who claimed this key in the registry's index, for when no order
        // comes of it.
        let claim = idempotency_key.clone();
        let release_claim = |registry: &SaleRegistry| {
            if let Some(k) = &claim {
                registry.keys.release(user_id, k, sale_id);
            }
        };
        let _span = tracing::debug_span!(parent: &span, "stock_actor", op = "reserve").entered();
        if !self.open {
            release_claim(&self.registry);
            let _ = reply.send(PurchaseReply::Unavailable);
            return;
        }
        match self
            .book
            .reserve(user_id, quantity, idempotency_key, Utc::now())
        {
            Err(Rejection::KeyReused) => {
                let _ = reply.send(PurchaseReply::Rejected(Rejection::KeyReused));
            }
            Err(r) => {
                release_claim(&self.registry);
                let _ = reply.send(PurchaseReply::Rejected(r));
            }
            Ok(Reserved::Replay(order, Durability::Durable)) => {
                let _ = reply.send(PurchaseReply::Replayed(order));
            }
            Ok(Reserved::Replay(order, Durability::Pending)) => {
                self.waiters
                    .entry(order.id)
                    .or_default()
                    .push(Waiter::Purchase {
                        reply,
                        original: false,
                    });
            }
            Ok(Reserved::Replay(_, Durability::InDoubt)) => {
                let _ = reply.send(PurchaseReply::Unavailable);
            }
            Ok(Reserved::ReplaySettled(id)) => {
                let _ = reply.send(match self.registry.orders.get(id) {
                    Some(order) => PurchaseReply::Replayed(order),
                    None => PurchaseReply::ReplayedStored(id),
                });
            }
            Ok(Reserved::New(order)) => {
                let id = order.id;
                if let Some(k) = &order.idempotency_key {
                    let used = KeyUse {
                        sale: sale_id,
                        quantity,
                    };
                    self.registry.keys.record(user_id, k, used);
                }
                match self.publish(LogEntry::Reserve { order }) {
                    Ok(()) => {
                        self.waiters.entry(id).or_default().push(Waiter::Purchase {
                            reply,
                            original: true,
                        });
                    }
                    Err(refused) => {
                        // Never handed over: as if it had never been made.
                        self.book.release(id);
                        release_claim(&self.registry);
                        let _ = reply.send(match refused {
                            PublishRefused::Full => PurchaseReply::Overloaded,
                            PublishRefused::Down => PurchaseReply::Unavailable,
                        });
                    }
                }
                self.changed();
            }
        }
    }
}

impl Handler<ReserveBatch> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: ReserveBatch, ctx: &mut Self::Context) {
        for reserve in msg.0 {
            <Self as Handler<Reserve>>::handle(self, reserve, ctx);
        }
    }
}

impl Handler<OrderAction> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: OrderAction, _: &mut Self::Context) {
        self.shared.leave();
        self.last_asked = std::time::Instant::now();
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
        // A reservation past its deadline is expired before anything else is
        // decided about it: payment and expiry cannot both win.
        self.expire_due();
        let OrderAction {
            order_id,
            user_id,
            action,
            reply,
            span,
        } = msg;
        let _span = tracing::debug_span!(parent: &span, "stock_actor", op = ?action).entered();
        if !self.open {
            let _ = reply.send(ActionReply::Unavailable);
            return;
        }
        match self.book.plan(order_id, user_id, action, Utc::now()) {
            Err(ActionRefused::NotDurable) => {
                let _ = reply.send(ActionReply::Unavailable);
            }
            Err(refused) => {
                let _ = reply.send(ActionReply::Refused(refused));
            }
            Ok(Plan::Unchanged(order, Durability::Durable)) => {
                let _ = reply.send(ActionReply::Done {
                    order,
                    changed: false,
                });
            }
            Ok(Plan::Unchanged(order, Durability::Pending)) => {
                self.waiters
                    .entry(order.id)
                    .or_default()
                    .push(Waiter::Action {
                        reply,
                        changed: false,
                    });
            }
            Ok(Plan::Unchanged(_, Durability::InDoubt)) => {
                let _ = reply.send(ActionReply::Unavailable);
            }
            Ok(Plan::Change(order)) => {
                let id = order.id;
                match self.publish(LogEntry::Transition {
                    order: order.clone(),
                }) {
                    Ok(()) => {
                        self.book.apply_change(order);
                        self.waiters.entry(id).or_default().push(Waiter::Action {
                            reply,
                            changed: true,
                        });
                        self.changed();
                    }
                    Err(PublishRefused::Full) => {
                        let _ = reply.send(ActionReply::Overloaded);
                    }
                    Err(PublishRefused::Down) => {
                        let _ = reply.send(ActionReply::Unavailable);
                    }
                }
            }
        }
    }
}

impl Handler<Settled> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: Settled, _: &mut Self::Context) {
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
        // The book first, then the shared view, then the answers: whoever
        // holds an answer reads a sale and an actor status that already
        // show it (a cancelled order's units back in stock).
        let confirmed: Vec<(Uuid, Option<Arc<Order>>)> = msg
            .confirmed
            .iter()
            .map(|&id| {
                let order = self.book.confirm(id).map(Arc::new);
                if let (Some(order), false) = (&order, msg.stored) {
                    self.registry.orders.upsert(order.clone());
                }
                (id, order)
            })
            .collect();
        for &id in &msg.in_doubt {
            self.book.mark_in_doubt(id);
        }
        for &id in &msg.released {
            if let Some(Order {
                user_id,
                idempotency_key: Some(key),
                ..
            }) = self.book.release(id)
            {
                self.registry
                    .keys
                    .release(user_id, &key, self.book.sale().id);
            }
        }
        self.changed();
        for (id, order) in confirmed {
            self.answer(id, order.as_ref(), Outcome::Confirmed);
        }
        for id in msg.in_doubt.into_iter().chain(msg.released) {
            self.answer(id, None, Outcome::Unavailable);
        }
    }
}

impl Handler<ChangeSale> for StockActor {
    type Result = AtomicResponse<Self, Result<Sale, ChangeError>>;

    fn handle(&mut self, msg: ChangeSale, _: &mut Self::Context) -> Self::Result {
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
        self.last_asked = std::time::Instant::now();
        if !self.open {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(ChangeError::Recovering))));
        }
        let now = Utc::now();
        let current = self.book.sale();
        let next = match msg.0 {
            SaleChange::Patch(patch) => current
                .patched(&patch, now, i64::from(self.book.units_held()))
                .map(|spec| Sale {
                    spec,
                    updated_at: now,
                    ..current.clone()
                }),
            SaleChange::Pause(paused) => current
                .ensure_not_ended(now)
                .map_err(|e: TransitionError| PatchError::from(e))
                .map(|()| Sale {
                    paused,
                    updated_at: if paused == current.paused {
                        current.updated_at
                    } else {
                        now
                    },
                    ..current.clone()
                }),
        };
        let store = self.store.clone();
        let unchanged = next.as_ref().is_ok_and(|n| n == current);
        AtomicResponse::new(Box::pin(
            async move {
                let next = next?;
                if !unchanged {
                    store.update_sale(&next).await?;
                }
                Ok(next)
            }
            .into_actor(self)
            .map(|res: Result<Sale, ChangeError>, act, _| {
                if let Ok(sale) = &res {
                    act.book.update_sale(sale.clone());
                    act.shared.publish_sale(sale);
                    act.changed();
                }
                res
            }),
        ))
    }
}

impl Handler<Reopen> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: Reopen, ctx: &mut Self::Context) {
        if let Some(book) = msg.book {
            self.book = book;
            record_keys(&self.book, &self.registry);
        }
        self.open = true;
        self.changed();
        self.expire_due();
        self.snapshot(ctx);
    }
}

/// Puts the idempotency keys of a book's orders in the registry's index.
fn record_keys(book: &SaleBook, registry: &SaleRegistry) {
    let sale = book.sale().id;
    for (user, key, quantity) in book.keyed_orders() {
        registry.keys.record(user, key, KeyUse { sale, quantity });
    }
}
