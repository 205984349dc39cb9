//! `SaleBook`: every purchase decision about one sale, as plain data.
//!
//! The stock actor owns exactly one book and feeds it one message at a time,
//! so the book needs no locks and its rules can be tested without an actor
//! system. It tracks remaining units, each buyer's held units, idempotency
//! keys, and every live order with its durability: an order is `Pending`
//! until the order log confirms it, `Durable` after, and `InDoubt` when its
//! publish failed in a way that leaves its fate unknown. Units of pending and
//! in-doubt orders stay held, so a failure can never cause an oversell.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::order::{Order, OrderStatus};
use super::sale::{Sale, SaleStatus};

/// Why a purchase was refused. Each maps to a stable 409 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    NotStarted,
    Ended,
    Paused,
    /// No units left, or fewer than asked for (`left` says how many).
    SoldOut {
        left: u32,
    },
    /// The user already holds `held` units and the limit is `limit`.
    LimitReached {
        held: u32,
        limit: u32,
    },
}

/// Whether the order log has made an order durable yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Pending,
    Durable,
    InDoubt,
}

/// What `reserve` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// A new order: it must go to the order log before anyone is told.
    New(Order),
    /// The same user and idempotency key already made this order.
    Replay(Order, Durability),
}

#[derive(Debug, Clone)]
struct Entry {
    order: Order,
    durability: Durability,
}

/// Per-sale counters in units, as PostgreSQL will count them once the order
/// log has drained (in-doubt orders are counted as reserved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BookCounters {
    pub reserved: u64,
    pub paid: u64,
    pub expired: u64,
    pub cancelled: u64,
}

#[derive(Debug, Clone)]
pub struct SaleBook {
    sale: Sale,
    remaining: u32,
    /// Units each user holds in reserved and paid orders of this sale.
    held_by: HashMap<Uuid, u32>,
    /// (user, idempotency key) → order id, for replays.
    keys: HashMap<(Uuid, String), Uuid>,
    /// Every order of this sale this process knows about.
    orders: HashMap<Uuid, Entry>,
    counters: BookCounters,
    /// Bumped on every change, published with snapshots.
    version: u64,
}

fn units(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

impl SaleBook {
    /// A book for a sale with no orders yet.
    pub fn new(sale: Sale) -> Self {
        let remaining = units(sale.spec.stock_total);
        SaleBook {
            sale,
            remaining,
            held_by: HashMap::new(),
            keys: HashMap::new(),
            orders: HashMap::new(),
            counters: BookCounters::default(),
            version: 0,
        }
    }

    /// Rebuilds a book from the orders PostgreSQL holds (recovery). Orders
    /// that hold no units (cancelled, expired) only feed the counters.
    pub fn restore(sale: Sale, orders: impl IntoIterator<Item = Order>) -> Self {
        let mut book = SaleBook::new(sale);
        for order in orders {
            book.counters_add(order.status, order.quantity);
            if matches!(order.status, OrderStatus::Reserved | OrderStatus::Paid) {
                book.hold(&order);
                if let Some(key) = &order.idempotency_key {
                    book.keys.insert((order.user_id, key.clone()), order.id);
                }
                book.orders.insert(
                    order.id,
                    Entry {
                        order,
                        durability: Durability::Durable,
                    },
                );
            }
        }
        book
    }

    pub fn sale(&self) -> &Sale {
        &self.sale
    }

    pub fn stock_left(&self) -> u32 {
        self.remaining
    }

    pub fn units_held(&self) -> u32 {
        units(self.sale.spec.stock_total) - self.remaining
    }

    pub fn counters(&self) -> BookCounters {
        self.counters
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn status(&self, now: DateTime<Utc>) -> SaleStatus {
        self.sale.status(now, i64::from(self.remaining))
    }

    pub fn order(&self, id: Uuid) -> Option<(&Order, Durability)> {
        self.orders.get(&id).map(|e| (&e.order, e.durability))
    }

    /// Orders that are not yet durable and whose fate is unknown.
    pub fn in_doubt(&self) -> impl Iterator<Item = &Order> {
        self.orders
            .values()
            .filter(|e| e.durability == Durability::InDoubt)
            .map(|e| &e.order)
    }

    fn counters_add(&mut self, status: OrderStatus, quantity: u32) {
        let q = u64::from(quantity);
        match status {
            OrderStatus::Reserved => self.counters.reserved += q,
            OrderStatus::Paid => self.counters.paid += q,
            OrderStatus::Expired => self.counters.expired += q,
            OrderStatus::Cancelled => self.counters.cancelled += q,
        }
    }

    fn hold(&mut self, order: &Order) {
        self.remaining = self.remaining.saturating_sub(order.quantity);
        *self.held_by.entry(order.user_id).or_insert(0) += order.quantity;
    }

    fn unhold(&mut self, order: &Order) {
        self.remaining += order.quantity;
        if let Some(h) = self.held_by.get_mut(&order.user_id) {
            *h = h.saturating_sub(order.quantity);
            if *h == 0 {
                self.held_by.remove(&order.user_id);
            }
        }
    }

    /// Decides a purchase. Checks, in order: an idempotent replay (answered
    /// whatever the sale's state now), the sale window, pause, the per-user
    /// limit, then stock; only then deducts and records a pending order.
    pub fn reserve(
        &mut self,
        user_id: Uuid,
        quantity: u32,
        idempotency_key: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Reserved, Rejection> {
        if let Some(key) = &idempotency_key {
            if let Some(id) = self.keys.get(&(user_id, key.clone())) {
                if let Some(e) = self.orders.get(id) {
                    return Ok(Reserved::Replay(e.order.clone(), e.durability));
                }
            }
        }
        let spec = &self.sale.spec;
        if now < spec.starts_at {
            return Err(Rejection::NotStarted);
        }
        if now >= spec.ends_at {
            return Err(Rejection::Ended);
        }
        if self.sale.paused {
            return Err(Rejection::Paused);
        }
        let limit = units(spec.per_user_limit);
        let held = self.held_by.get(&user_id).copied().unwrap_or(0);
        if held.saturating_add(quantity) > limit {
            return Err(Rejection::LimitReached { held, limit });
        }
        if quantity > self.remaining {
            return Err(Rejection::SoldOut {
                left: self.remaining,
            });
        }
        let order = Order {
            id: Uuid::now_v7(),
            sale_id: self.sale.id,
            user_id,
            quantity,
            status: OrderStatus::Reserved,
            created_at: now,
            expires_at: now + Duration::seconds(spec.reservation_ttl_secs),
            paid_at: None,
            idempotency_key,
        };
        self.hold(&order);
        self.counters_add(OrderStatus::Reserved, quantity);
        if let Some(key) = &order.idempotency_key {
            self.keys.insert((user_id, key.clone()), order.id);
        }
        self.orders.insert(
            order.id,
            Entry {
                order: order.clone(),
                durability: Durability::Pending,
            },
        );
        self.version += 1;
        Ok(Reserved::New(order))
    }

    /// The order log confirmed the order (also for one that was in doubt and
    /// turned out to be in PostgreSQL). Returns the order when it changed.
    pub fn confirm(&mut self, id: Uuid) -> Option<&Order> {
        let e = self.orders.get_mut(&id)?;
        if e.durability == Durability::Durable {
            return None;
        }
        e.durability = Durability::Durable;
        Some(&e.order)
    }

    /// The order's publish failed with its fate unknown: keep its units held.
    pub fn mark_in_doubt(&mut self, id: Uuid) {
        if let Some(e) = self.orders.get_mut(&id) {
            if e.durability == Durability::Pending {
                e.durability = Durability::InDoubt;
            }
        }
    }

    /// The order never became durable (it was never published, or it was in
    /// doubt and PostgreSQL does not have it): give its units back as if it
    /// had never been made, and forget its idempotency key. A durable order
    /// is never released this way.
    pub fn release(&mut self, id: Uuid) -> Option<Order> {
        match self.orders.get(&id) {
            Some(e) if e.durability != Durability::Durable => {}
            _ => return None,
        }
        let e = self.orders.remove(&id)?;
        self.unhold(&e.order);
        self.counters.reserved = self
            .counters
            .reserved
            .saturating_sub(u64::from(e.order.quantity));
        if let Some(key) = &e.order.idempotency_key {
            self.keys.remove(&(e.order.user_id, key.clone()));
        }
        self.version += 1;
        Some(e.order)
    }

    /// Replaces the sale's definition (an admin edit already validated
    /// against `units_held`). Stock changes move `remaining` by the same amount.
    pub fn update_sale(&mut self, sale: Sale) {
        let held = self.units_held();
        self.remaining = units(sale.spec.stock_total).saturating_sub(held);
        self.sale = sale;
        self.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::sale::SaleSpec;

    fn sale(stock: i64, limit: i64) -> Sale {
        let now = Utc::now();
        Sale {
            id: Uuid::now_v7(),
            spec: SaleSpec {
                name: "s".into(),
                description: String::new(),
                price_cents: 100,
                currency: "EUR".into(),
                stock_total: stock,
                per_user_limit: limit,
                starts_at: now - Duration::minutes(1),
                ends_at: now + Duration::minutes(10),
                reservation_ttl_secs: 60,
            },
            paused: false,
            created_at: now,
            updated_at: now,
        }
    }

    fn new_order(r: Result<Reserved, Rejection>) -> Order {
        match r {
            Ok(Reserved::New(o)) => o,
            other => panic!("expected a new order, got {other:?}"),
        }
    }

    #[test]
    fn deducts_and_sells_out() {
        let mut book = SaleBook::new(sale(3, 3));
        let now = Utc::now();
        let u = Uuid::new_v4();
        let o = new_order(book.reserve(u, 2, None, now));
        assert_eq!(o.quantity, 2);
        assert_eq!(o.status, OrderStatus::Reserved);
        assert_eq!(o.expires_at, now + Duration::seconds(60));
        assert_eq!(book.stock_left(), 1);
        assert_eq!(
            book.reserve(Uuid::new_v4(), 2, None, now),
            Err(Rejection::SoldOut { left: 1 })
        );
        new_order(book.reserve(Uuid::new_v4(), 1, None, now));
        assert_eq!(book.stock_left(), 0);
        assert_eq!(book.status(now), SaleStatus::SoldOut);
        assert_eq!(
            book.reserve(Uuid::new_v4(), 1, None, now),
            Err(Rejection::SoldOut { left: 0 })
        );
        assert_eq!(book.counters().reserved, 3);
        assert_eq!(book.units_held(), 3);
    }

    #[test]
    fn enforces_the_per_user_limit() {
        let mut book = SaleBook::new(sale(10, 2));
        let now = Utc::now();
        let u = Uuid::new_v4();
        new_order(book.reserve(u, 1, None, now));
        assert_eq!(
            book.reserve(u, 2, None, now),
            Err(Rejection::LimitReached { held: 1, limit: 2 })
        );
        new_order(book.reserve(u, 1, None, now));
        assert_eq!(
            book.reserve(u, 1, None, now),
            Err(Rejection::LimitReached { held: 2, limit: 2 })
        );
        // Another user is unaffected.
        new_order(book.reserve(Uuid::new_v4(), 2, None, now));
        assert_eq!(book.stock_left(), 6);
    }

    #[test]
    fn checks_the_window_and_pause() {
        let s = sale(5, 1);
        let (start, end) = (s.spec.starts_at, s.spec.ends_at);
        let mut book = SaleBook::new(s);
        let u = Uuid::new_v4();
        assert_eq!(
            book.reserve(u, 1, None, start - Duration::milliseconds(1)),
            Err(Rejection::NotStarted)
        );
        assert_eq!(book.reserve(u, 1, None, end), Err(Rejection::Ended));
        let mut paused = book.sale().clone();
        paused.paused = true;
        book.update_sale(paused);
        assert_eq!(book.reserve(u, 1, None, start), Err(Rejection::Paused));
        assert_eq!(book.stock_left(), 5);
        let mut live = book.sale().clone();
        live.paused = false;
        book.update_sale(live);
        new_order(book.reserve(u, 1, None, start));
    }

    #[test]
    fn replays_an_idempotency_key_even_after_sell_out_or_end() {
        let s = sale(1, 1);
        let end = s.spec.ends_at;
        let mut book = SaleBook::new(s);
        let now = Utc::now();
        let u = Uuid::new_v4();
        let o = new_order(book.reserve(u, 1, Some("k1".into()), now));
        match book.reserve(u, 1, Some("k1".into()), now) {
            Ok(Reserved::Replay(r, Durability::Pending)) => assert_eq!(r, o),
            other => panic!("{other:?}"),
        }
        book.confirm(o.id);
        match book.reserve(u, 1, Some("k1".into()), end + Duration::hours(1)) {
            Ok(Reserved::Replay(r, Durability::Durable)) => assert_eq!(r.id, o.id),
            other => panic!("{other:?}"),
        }
        // Same key, other user: a different purchase (and sold out here).
        assert_eq!(
            book.reserve(Uuid::new_v4(), 1, Some("k1".into()), now),
            Err(Rejection::SoldOut { left: 0 })
        );
        // Same user, other key: the limit applies.
        assert_eq!(
            book.reserve(u, 1, Some("k2".into()), now),
            Err(Rejection::LimitReached { held: 1, limit: 1 })
        );
    }

    #[test]
    fn in_doubt_orders_hold_units_until_released() {
        let mut book = SaleBook::new(sale(2, 1));
        let now = Utc::now();
        let u = Uuid::new_v4();
        let o = new_order(book.reserve(u, 1, Some("k".into()), now));
        book.mark_in_doubt(o.id);
        assert_eq!(book.stock_left(), 1);
        assert_eq!(book.in_doubt().count(), 1);
        match book.reserve(u, 1, Some("k".into()), now) {
            Ok(Reserved::Replay(_, Durability::InDoubt)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(book.release(o.id).map(|r| r.id), Some(o.id));
        assert_eq!(book.stock_left(), 2);
        assert_eq!(book.counters().reserved, 0);
        // The key is free again and the user may buy again.
        let again = new_order(book.reserve(u, 1, Some("k".into()), now));
        assert_ne!(again.id, o.id);
        // A durable order is never released.
        book.confirm(again.id);
        assert_eq!(book.release(again.id), None);
        assert_eq!(book.stock_left(), 1);
    }

    #[test]
    fn an_in_doubt_order_found_durable_is_kept() {
        let mut book = SaleBook::new(sale(2, 1));
        let o = new_order(book.reserve(Uuid::new_v4(), 1, None, Utc::now()));
        book.mark_in_doubt(o.id);
        assert!(book.confirm(o.id).is_some());
        assert_eq!(book.in_doubt().count(), 0);
        assert_eq!(book.release(o.id), None);
        assert_eq!(book.stock_left(), 1);
    }

    #[test]
    fn restore_counts_what_orders_hold() {
        let s = sale(10, 2);
        let now = Utc::now();
        let u = Uuid::new_v4();
        let mk = |status, q, key: Option<&str>| Order {
            id: Uuid::now_v7(),
            sale_id: s.id,
            user_id: u,
            quantity: q,
            status,
            created_at: now,
            expires_at: now + Duration::seconds(60),
            paid_at: None,
            idempotency_key: key.map(str::to_owned),
        };
        let reserved = mk(OrderStatus::Reserved, 1, Some("a"));
        let orders = vec![
            reserved.clone(),
            mk(OrderStatus::Paid, 1, None),
            mk(OrderStatus::Cancelled, 2, None),
            mk(OrderStatus::Expired, 1, None),
        ];
        let mut book = SaleBook::restore(s, orders);
        assert_eq!(book.stock_left(), 8);
        assert_eq!(
            book.counters(),
            BookCounters {
                reserved: 1,
                paid: 1,
                expired: 1,
                cancelled: 2
            }
        );
        assert_eq!(
            book.reserve(u, 1, None, now),
            Err(Rejection::LimitReached { held: 2, limit: 2 })
        );
        match book.reserve(u, 1, Some("a".into()), now) {
            Ok(Reserved::Replay(o, Durability::Durable)) => assert_eq!(o.id, reserved.id),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stock_edits_move_remaining() {
        let mut book = SaleBook::new(sale(5, 5));
        new_order(book.reserve(Uuid::new_v4(), 3, None, Utc::now()));
        let mut bigger = book.sale().clone();
        bigger.spec.stock_total = 8;
        book.update_sale(bigger);
        assert_eq!(book.stock_left(), 5);
        let mut exact = book.sale().clone();
        exact.spec.stock_total = 3;
        book.update_sale(exact);
        assert_eq!(book.stock_left(), 0);
    }
}
