//! `StockActor`: the one owner of a sale's stock.
//!
//! It holds a [`SaleBook`] and applies every decision to it in mailbox order:
//! reserve, settle what the order log confirmed, apply admin changes. A new
//! reservation is handed to the [`OrderPublisher`] and its buyer is answered
//! only when the batch it travels in is confirmed (or its fate is known).
//! After each change it publishes hints for the HTTP workers
//! ([`SaleShared`]) and, at most every `stock.snapshot_interval_ms`, a
//! snapshot to Redis that never holds up a purchase.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::Utc;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::registry::{SaleHandle, SaleRegistry, SaleShared};
use crate::domain::order::Order;
use crate::domain::sale::{PatchError, Sale, SalePatch, TransitionError};
use crate::domain::sale_book::{Durability, Rejection, Reserved, SaleBook};
use crate::persistence::order_log::LogEntry;
use crate::persistence::postgres::{Database, StoreError};
use crate::persistence::publisher::{OrderPublisher, PublishRefused, PublishRequest, Settled};
use crate::persistence::redis::RedisStore;

/// The answer to a purchase.
#[derive(Debug)]
pub enum PurchaseReply {
    /// A new order, now durable (HTTP 201).
    Created(Order),
    /// The order this idempotency key made before, durable (HTTP 200).
    Replayed(Order),
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
}

/// Applies an admin change: validated against the units orders hold, written
/// to PostgreSQL, then applied, with no purchase decided in between.
#[derive(Message)]
#[rtype(result = "Result<Sale, ChangeError>")]
pub struct ChangeSale(pub SaleChange);

/// Who waits for an order's fate, and whether they made it or replay it.
struct Waiter {
    reply: oneshot::Sender<PurchaseReply>,
    original: bool,
}

pub struct StockActor {
    book: SaleBook,
    shared: Arc<SaleShared>,
    registry: Arc<SaleRegistry>,
    publisher: OrderPublisher,
    db: Database,
    redis: RedisStore,
    snapshot_interval: Duration,
    snapshot_in_flight: bool,
    waiters: HashMap<Uuid, Vec<Waiter>>,
}

/// What a stock actor needs besides its book.
#[derive(Clone)]
pub struct StockDeps {
    pub registry: Arc<SaleRegistry>,
    pub publisher: OrderPublisher,
    pub db: Database,
    pub redis: RedisStore,
    pub mailbox_capacity: usize,
    pub snapshot_interval: Duration,
    /// Where stock actors run: one arbiter for all of them, not the HTTP
    /// workers' (those stop first at shutdown, while orders still settle).
    pub arbiter: actix::ArbiterHandle,
}

impl StockActor {
    /// Starts the actor for `book` on the stock arbiter and registers it.
    pub fn launch(book: SaleBook, deps: &StockDeps) -> SaleHandle {
        let shared = Arc::new(SaleShared::new(&book, deps.mailbox_capacity));
        let sale_id = book.sale().id;
        let actor = StockActor {
            book,
            shared: shared.clone(),
            registry: deps.registry.clone(),
            publisher: deps.publisher.clone(),
            db: deps.db.clone(),
            redis: deps.redis.clone(),
            snapshot_interval: deps.snapshot_interval,
            snapshot_in_flight: false,
            waiters: HashMap::new(),
        };
        let capacity = deps.mailbox_capacity;
        let addr = StockActor::start_in_arbiter(&deps.arbiter, move |ctx| {
            ctx.set_mailbox_capacity(capacity);
            actor
        });
        let handle = SaleHandle { addr, shared };
        deps.registry.insert(sale_id, handle.clone());
        handle
    }

    fn changed(&mut self) {
        self.shared.publish_stock(&self.book);
    }

    fn answer(&mut self, id: Uuid, reply: impl Fn(&Order, bool) -> PurchaseReply) {
        let Some(waiters) = self.waiters.remove(&id) else {
            return;
        };
        let order = self.book.order(id).map(|(o, _)| o.clone());
        for w in waiters {
            let r = match &order {
                Some(o) => reply(o, w.original),
                None => PurchaseReply::Unavailable,
            };
            let _ = w.reply.send(r);
        }
    }

    fn snapshot(&mut self, ctx: &mut Context<Self>) {
        let version = self.book.version();
        if self.snapshot_in_flight
            || version == self.shared.snapshot_version.load(Ordering::Relaxed)
        {
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
        let redis = self.redis.clone();
        let key = redis.key(&format!("sale:{}", self.book.sale().id));
        ctx.spawn(
            async move {
                let refs: Vec<(&str, String)> =
                    fields.iter().map(|(k, v)| (*k, v.clone())).collect();
                redis.write_hash(&key, &refs).await
            }
            .into_actor(self)
            .map(move |res, act, _| {
                act.snapshot_in_flight = false;
                match res {
                    Ok(()) => {
                        act.shared
                            .snapshot_version
                            .store(version, Ordering::Relaxed);
                        act.shared
                            .snapshot_at_ms
                            .store(now.timestamp_millis(), Ordering::Relaxed);
                    }
                    Err(e) => {
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
        self.snapshot(ctx);
    }
}

impl Handler<Reserve> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: Reserve, ctx: &mut Self::Context) {
        self.shared.leave();
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
        let Reserve {
            user_id,
            quantity,
            idempotency_key,
            reply,
        } = msg;
        match self
            .book
            .reserve(user_id, quantity, idempotency_key, Utc::now())
        {
            Err(r) => {
                let _ = reply.send(PurchaseReply::Rejected(r));
            }
            Ok(Reserved::Replay(order, Durability::Durable)) => {
                let _ = reply.send(PurchaseReply::Replayed(order));
            }
            Ok(Reserved::Replay(order, Durability::Pending)) => {
                self.waiters.entry(order.id).or_default().push(Waiter {
                    reply,
                    original: false,
                });
            }
            Ok(Reserved::Replay(_, Durability::InDoubt)) => {
                let _ = reply.send(PurchaseReply::Unavailable);
            }
            Ok(Reserved::New(order)) => {
                let id = order.id;
                let request = PublishRequest {
                    sale_id: order.sale_id,
                    entry: LogEntry::Reserve { order },
                    notify: ctx.address().recipient(),
                };
                match self.publisher.try_publish(request) {
                    Ok(()) => {
                        self.waiters.entry(id).or_default().push(Waiter {
                            reply,
                            original: true,
                        });
                    }
                    Err(refused) => {
                        // Never handed over: as if it had never been made.
                        self.book.release(id);
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

impl Handler<Settled> for StockActor {
    type Result = ();

    fn handle(&mut self, msg: Settled, _: &mut Self::Context) {
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
        for id in msg.confirmed {
            if let Some(order) = self.book.confirm(id) {
                self.registry.orders.upsert(order);
            }
            self.answer(id, |o, original| {
                if original {
                    PurchaseReply::Created(o.clone())
                } else {
                    PurchaseReply::Replayed(o.clone())
                }
            });
        }
        for id in msg.in_doubt {
            self.book.mark_in_doubt(id);
            self.answer(id, |_, _| PurchaseReply::Unavailable);
        }
        for id in msg.released {
            self.answer(id, |_, _| PurchaseReply::Unavailable);
            self.book.release(id);
        }
        self.changed();
    }
}

impl Handler<ChangeSale> for StockActor {
    type Result = AtomicResponse<Self, Result<Sale, ChangeError>>;

    fn handle(&mut self, msg: ChangeSale, _: &mut Self::Context) -> Self::Result {
        self.shared.messages_handled.fetch_add(1, Ordering::Relaxed);
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
        let db = self.db.clone();
        let unchanged = next.as_ref().is_ok_and(|n| n == current);
        AtomicResponse::new(Box::pin(
            async move {
                let next = next?;
                if !unchanged {
                    db.update_sale(&next).await?;
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
