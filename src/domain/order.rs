//! Orders as shoppers see them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Reserved,
    Paid,
    Cancelled,
    Expired,
}

impl OrderStatus {
    /// Whether the order's units are (or were, until released) held.
    pub fn holds_units(self) -> bool {
        matches!(self, OrderStatus::Reserved | OrderStatus::Paid)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => OrderStatus::Reserved,
            "paid" => OrderStatus::Paid,
            "cancelled" => OrderStatus::Cancelled,
            "expired" => OrderStatus::Expired,
            _ => return None,
        })
    }
}

/// An order: a reservation of `quantity` units of a sale by one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub sale_id: Uuid,
    pub user_id: Uuid,
    pub quantity: u32,
    pub status: OrderStatus,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    /// When it was cancelled or expired.
    #[serde(default)]
    pub closed_at: Option<DateTime<Utc>>,
    /// The client's `Idempotency-Key`, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
    /// The unit price when the reservation was made, in minor units: what a
    /// payment charges per unit, whatever the sale's price is now.
    pub price_cents: i64,
    /// The currency of `price_cents` (ISO 4217).
    pub currency: String,
}

#[cfg(test)]
impl Order {
    /// A reservation of one unit made at `at` (and due at once), for tests
    /// that need an order and care only about who and which sale.
    pub fn test_reservation(id: Uuid, sale_id: Uuid, user_id: Uuid, at: DateTime<Utc>) -> Order {
        Order {
            id,
            sale_id,
            user_id,
            quantity: 1,
            status: OrderStatus::Reserved,
            created_at: at,
            expires_at: at,
            paid_at: None,
            closed_at: None,
            idempotency_key: None,
            price_cents: 100,
            currency: "EUR".into(),
        }
    }
}
