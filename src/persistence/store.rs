//! The store: users, sales and orders, whichever engine holds them.
//!
//! [`Store`] is what the HTTP handlers, the stock actors and the order log's
//! resolver ask of the source of truth. Each storage mode has one
//! implementation: [`super::sqlite::SqliteStore`] (embedded) and
//! [`super::postgres::PostgresStore`] (services). Callers deal in domain
//! types and [`StoreError`]; no driver type crosses this line.

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::domain::order::Order;
use crate::domain::sale::Sale;
use crate::domain::sale_book::SaleBook;

/// The store every part of the server shares.
pub type SharedStore = Arc<dyn Store>;

/// Failures of the store, as the callers need to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the row (what it guards is kept).
    #[error("unique constraint {0} violated")]
    Duplicate(String),
    /// No connection could be had in time: the store is down or saturated.
    #[error("no database connection available in time")]
    Unavailable,
    /// Anything else the engine reported.
    #[error("database error: {0}")]
    Engine(String),
}

/// How a webhook event stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventClaim {
    /// First seen now: handle it, then `finish_payment_event`.
    New,
    /// Handled before, with this result.
    Done(String),
    /// Another delivery of it is being handled right now.
    InProgress,
}

/// Users, sales, orders and payment events. Every method is bounded in time
/// by its implementation (a statement deadline), except the recovery reads,
/// which take as long as the store is large.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The engine's name, for readiness and messages ("sqlite", "postgres").
    fn engine(&self) -> &'static str;

    /// A round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn insert_user(
        &self,
        id: Uuid,
        username: &str,
        password_hash: &str,
    ) -> Result<(), StoreError>;

    /// The id and password hash of a user, if the username exists.
    async fn user_credentials(&self, username: &str) -> Result<Option<(Uuid, String)>, StoreError>;

    async fn insert_sale(&self, sale: &Sale) -> Result<(), StoreError>;

    /// Writes a sale's editable fields and pause flag.
    async fn update_sale(&self, sale: &Sale) -> Result<(), StoreError>;

    /// Every sale, newest start first.
    async fn list_sales(&self) -> Result<Vec<Sale>, StoreError>;

    /// Rebuilds the book of each of `sales` from the orders the store holds
    /// (void ones aside), streaming the rows: a store of millions of orders
    /// restarts in the memory its books take.
    async fn restore_books(&self, sales: Vec<Sale>) -> Result<HashMap<Uuid, SaleBook>, StoreError>;

    /// The book of one sale, rebuilt as [`Store::restore_books`] does.
    async fn restore_book(&self, sale: Sale) -> Result<SaleBook, StoreError> {
        let (id, fallback) = (sale.id, sale.clone());
        let mut books = self.restore_books(vec![sale]).await?;
        Ok(books.remove(&id).unwrap_or_else(|| SaleBook::new(fallback)))
    }

    /// One order, whoever owns it (callers check ownership).
    async fn order(&self, id: Uuid) -> Result<Option<Order>, StoreError>;

    /// A user's orders, newest first, at most `limit`.
    async fn user_orders(&self, user_id: Uuid, limit: i64) -> Result<Vec<Order>, StoreError>;

    /// Writes orders in their latest state with the order log's own upsert
    /// (idempotent, order-independent, only ever moving a row out of
    /// `reserved`): for decisions whose append to the log failed.
    async fn write_orders(&self, orders: &[&Order]) -> Result<(), StoreError>;

    /// The status the store holds for each of `ids` that it has.
    async fn order_statuses(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, String>, StoreError>;

    /// Decides reservations whose append was never confirmed: an order the
    /// store has stands; every other one gets a `void` row under its id, so
    /// that a late copy can never be inserted. Returns the ids voided.
    async fn void_absent(&self, orders: &[&Order]) -> Result<Vec<Uuid>, StoreError>;

    /// Claims a payment webhook event, or tells how an earlier delivery went.
    async fn claim_payment_event(
        &self,
        event_id: &str,
        order_id: Uuid,
    ) -> Result<EventClaim, StoreError>;

    /// Records how a claimed event was handled.
    async fn finish_payment_event(&self, event_id: &str, result: &str) -> Result<(), StoreError>;

    /// Gives a claimed event up: a later delivery handles it afresh.
    async fn forget_payment_event(&self, event_id: &str) -> Result<(), StoreError>;
}

/// One row per order, its latest state, sorted by id (a row may be touched
/// once per statement; concurrent writers lock in one order).
pub fn latest_states<'a>(orders: impl IntoIterator<Item = &'a Order>) -> Vec<&'a Order> {
    let mut latest: std::collections::BTreeMap<Uuid, &Order> = Default::default();
    for o in orders {
        latest.insert(o.id, o);
    }
    latest.into_values().collect()
}
