//! The order log's bytes: a format of its own, versioned, never the API type.
//!
//! Messages outlive the process that wrote them (they wait in RabbitMQ across
//! a crash or an upgrade), so what is written here is a contract with every
//! later version of the server: renaming a field of the API's `Order` must
//! not change a byte of it. A writer reads every version it knows and refuses
//! (to the dead-letter queue) one it does not.
//!
//! - **v2** (written since the wire got its own type): short field names,
//!   times as integer microseconds since the Unix epoch (PostgreSQL keeps
//!   microseconds), the status as its own enum, the unit price and currency
//!   fixed at reservation.
//!   `{"v":2,"entries":[{"op":"reserve","order":{"id","sale","user","qty","status","created_us","expires_us","paid_us","closed_us","key","price","cur"}}]}`
//! - **v1** (read only): the entry's order spelled as the API spelled it then,
//!   times as RFC 3339 strings, no price: such an order is read with an empty
//!   currency, and the writer gives it its sale's price (`OrderStore`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::order::{Order, OrderStatus};

/// The version this server writes.
pub const VERSION: u32 = 2;

/// An order's status on the wire (kept apart from the API's enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Reserved,
    Paid,
    Cancelled,
    Expired,
}

impl From<OrderStatus> for Status {
    fn from(s: OrderStatus) -> Self {
        match s {
            OrderStatus::Reserved => Status::Reserved,
            OrderStatus::Paid => Status::Paid,
            OrderStatus::Cancelled => Status::Cancelled,
            OrderStatus::Expired => Status::Expired,
        }
    }
}

impl From<Status> for OrderStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Reserved => OrderStatus::Reserved,
            Status::Paid => OrderStatus::Paid,
            Status::Cancelled => OrderStatus::Cancelled,
            Status::Expired => OrderStatus::Expired,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Op {
    Reserve,
    Transition,
}

/// A v2 order. `K` is `&str` when writing (no copy of the key) and `String`
/// when reading.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderV2<K> {
    id: Uuid,
    sale: Uuid,
    user: Uuid,
    qty: u32,
    status: Status,
    created_us: i64,
    expires_us: i64,
    paid_us: Option<i64>,
    closed_us: Option<i64>,
    key: Option<K>,
    price: i64,
    cur: K,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryV2<K> {
    op: Op,
    order: OrderV2<K>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageV2<K> {
    v: u32,
    entries: Vec<EntryV2<K>>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64, field: &str) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| format!("{field} {us} is out of range"))
}

/// One message (v2) for a batch of entries, from references.
pub(super) fn encode<'a>(entries: impl Iterator<Item = (Op, &'a Order)>) -> Vec<u8> {
    let entries = entries
        .map(|(op, o)| EntryV2 {
            op,
            order: OrderV2 {
                id: o.id,
                sale: o.sale_id,
                user: o.user_id,
                qty: o.quantity,
                status: o.status.into(),
                created_us: micros(o.created_at),
                expires_us: micros(o.expires_at),
                paid_us: o.paid_at.map(micros),
                closed_us: o.closed_at.map(micros),
                key: o.idempotency_key.as_deref(),
                price: o.price_cents,
                cur: o.currency.as_str(),
            },
        })
        .collect();
    // Serialising plain data into a Vec cannot fail.
    serde_json::to_vec(&MessageV2 {
        v: VERSION,
        entries,
    })
    .unwrap_or_default()
}

/// Reads a message of any version this server knows, as (op, order) pairs.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<(Op, Order)>, String> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    // What this server writes starts so; anything else is looked at first.
    let version = if bytes.starts_with(br#"{"v":2,"#) {
        VERSION
    } else {
        serde_json::from_slice::<Version>(bytes)
            .map_err(|e| e.to_string())?
            .v
    };
    match version {
        2 => decode_v2(bytes),
        1 => decode_v1(bytes),
        v => Err(format!(
            "schema version {v} (this server reads 1 and 2, and writes {VERSION})"
        )),
    }
}

fn decode_v2(bytes: &[u8]) -> Result<Vec<(Op, Order)>, String> {
    let msg: MessageV2<String> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if msg.v != 2 {
        return Err(format!("schema version {} read as 2", msg.v));
    }
    msg.entries
        .into_iter()
        .map(|e| {
            let o = e.order;
            Ok((
                e.op,
                Order {
                    id: o.id,
                    sale_id: o.sale,
                    user_id: o.user,
                    quantity: o.qty,
                    status: o.status.into(),
                    created_at: from_micros(o.created_us, "created_us")?,
                    expires_at: from_micros(o.expires_us, "expires_us")?,
                    paid_at: o.paid_us.map(|t| from_micros(t, "paid_us")).transpose()?,
                    closed_at: o
                        .closed_us
                        .map(|t| from_micros(t, "closed_us"))
                        .transpose()?,
                    idempotency_key: o.key,
                    price_cents: o.price,
                    currency: o.cur,
                },
            ))
        })
        .collect()
}

/// The v1 order as it was spelled on the wire (the API's field names then).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderV1 {
    id: Uuid,
    sale_id: Uuid,
    user_id: Uuid,
    quantity: u32,
    status: Status,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
    #[serde(default)]
    closed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryV1 {
    op: Op,
    order: OrderV1,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageV1 {
    #[allow(dead_code)]
    v: u32,
    entries: Vec<EntryV1>,
}

fn decode_v1(bytes: &[u8]) -> Result<Vec<(Op, Order)>, String> {
    let msg: MessageV1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(msg
        .entries
        .into_iter()
        .map(|e| {
            let o = e.order;
            (
                e.op,
                Order {
                    id: o.id,
                    sale_id: o.sale_id,
                    user_id: o.user_id,
                    quantity: o.quantity,
                    status: o.status.into(),
                    created_at: o.created_at,
                    expires_at: o.expires_at,
                    paid_at: o.paid_at,
                    closed_at: o.closed_at,
                    idempotency_key: o.idempotency_key,
                    // Not on the wire in v1: filled in from the sale when applied.
                    price_cents: 0,
                    currency: String::new(),
                },
            )
        })
        .collect())
}
