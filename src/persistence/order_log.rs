//! The order log's message format and how a message is applied to PostgreSQL.
//!
//! One RabbitMQ message carries a batch of entries (group commit). Messages
//! carry a schema version `v`; a writer refuses a version it does not know
//! (to the dead-letter queue) rather than guess.
//!
//! Every entry carries the whole order in its new state, and is applied as
//! one upsert keyed on the order id that only ever moves an order *out of*
//! `reserved`. So applying is idempotent (a redelivered message changes
//! nothing) and order-independent: with several writers a payment may reach
//! PostgreSQL before its reservation, and the row still ends `paid`.

use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;

use crate::domain::order::Order;

pub const LOG_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogMessage {
    pub v: u32,
    pub entries: Vec<LogEntry>,
}

/// One change to the orders table.
///
/// On the wire `{"op": "reserve" | "transition", "order": {..}}`. It is read
/// through [`WireEntry`], a plain struct: serde reads an internally tagged
/// enum by buffering every entry into an intermediate tree first, which was
/// most of a writer's decoding time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "op",
    rename_all = "snake_case",
    deny_unknown_fields,
    from = "WireEntry"
)]
pub enum LogEntry {
    /// A new reservation (status `reserved`).
    Reserve { order: Order },
    /// A reservation paid, cancelled or expired (the order in its new state).
    Transition { order: Order },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEntry {
    op: WireOp,
    order: Order,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireOp {
    Reserve,
    Transition,
}

impl From<WireEntry> for LogEntry {
    fn from(e: WireEntry) -> Self {
        match e.op {
            WireOp::Reserve => LogEntry::Reserve { order: e.order },
            WireOp::Transition => LogEntry::Transition { order: e.order },
        }
    }
}

impl LogEntry {
    pub fn order(&self) -> &Order {
        match self {
            LogEntry::Reserve { order } | LogEntry::Transition { order } => order,
        }
    }

    pub fn order_id(&self) -> uuid::Uuid {
        self.order().id
    }
}

/// Why a message could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The message can never be applied (bad JSON, unknown version, data the
    /// schema refuses): it goes to the dead-letter queue.
    #[error("malformed order-log message: {0}")]
    Malformed(String),
    /// The database failed in a way that may pass: retry.
    #[error("transient database error: {0}")]
    Transient(#[from] tokio_postgres::Error),
}

/// One message for a batch, serialised from references (no copy of the orders).
pub fn encode(entries: &[&LogEntry]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        v: u32,
        entries: &'a [&'a LogEntry],
    }
    // Serialising plain data into a Vec cannot fail.
    serde_json::to_vec(&Out {
        v: LOG_SCHEMA_VERSION,
        entries,
    })
    .unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<LogMessage, ApplyError> {
    let msg: LogMessage =
        serde_json::from_slice(bytes).map_err(|e| ApplyError::Malformed(e.to_string()))?;
    if msg.v != LOG_SCHEMA_VERSION {
        return Err(ApplyError::Malformed(format!(
            "schema version {} (this server writes {LOG_SCHEMA_VERSION})",
            msg.v
        )));
    }
    Ok(msg)
}

/// Errors in the data itself (constraint violations, bad values) will fail
/// the same way every time; anything else (connection, serialization,
/// deadlock) may pass on a retry.
fn classify(e: tokio_postgres::Error) -> ApplyError {
    match e.code() {
        Some(code)
            if code.code().starts_with("22")
                || (code.code().starts_with("23") && code != &SqlState::UNIQUE_VIOLATION) =>
        {
            ApplyError::Malformed(e.to_string())
        }
        _ => ApplyError::Transient(e),
    }
}

/// A writer's session with PostgreSQL: its connection, the upsert prepared
/// once, and the sales it has already seen exist.
///
/// Applying a message is one prepared statement (atomic on its own, so no
/// explicit transaction and no extra round trips). `orders.sale_id` has no
/// foreign key (migration V3): every order of a hot sale would take a
/// `FOR KEY SHARE` lock on the same `sales` row, and with several writers
/// PostgreSQL turns those into multixacts, which cost more than the insert.
/// Sales are never deleted, so the store checks each sale id once per
/// connection and refuses a message naming an unknown sale, as the foreign
/// key did.
pub struct OrderStore {
    client: tokio_postgres::Client,
    upsert: tokio_postgres::Statement,
    known_sales: std::collections::HashSet<uuid::Uuid>,
}

const UPSERT_ORDERS: &str = "INSERT INTO orders (id, sale_id, user_id, quantity, status, idempotency_key, created_at, expires_at, paid_at, closed_at) \
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[], \
                          $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[]) \
     ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, paid_at = EXCLUDED.paid_at, closed_at = EXCLUDED.closed_at \
     WHERE orders.status = 'reserved' AND EXCLUDED.status <> 'reserved'";

impl OrderStore {
    /// Prepares the upsert on `client`.
    pub async fn new(client: tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let upsert = client.prepare(UPSERT_ORDERS).await?;
        Ok(OrderStore {
            client,
            upsert,
            known_sales: Default::default(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Applies every entry of `msgs`, in their order, with one statement;
    /// returns the rows inserted or moved (a replayed message moves none).
    pub async fn apply(&mut self, msgs: &[&LogMessage]) -> Result<u64, ApplyError> {
        // One row per order, its latest state (a row may be touched only
        // once per statement), sorted by id so concurrent writers lock in one
        // order.
        let mut latest: std::collections::BTreeMap<uuid::Uuid, &Order> = Default::default();
        for e in msgs.iter().flat_map(|m| &m.entries) {
            let o = e.order();
            latest.insert(o.id, o);
        }
        let orders: Vec<&Order> = latest.into_values().collect();
        if orders.is_empty() {
            return Ok(0);
        }
        self.check_sales(&orders).await?;
        self.upsert(&orders).await.map_err(classify)
    }

    /// Refuses a message naming a sale that does not exist.
    async fn check_sales(&mut self, orders: &[&Order]) -> Result<(), ApplyError> {
        let mut unknown: Vec<uuid::Uuid> = orders
            .iter()
            .map(|o| o.sale_id)
            .filter(|id| !self.known_sales.contains(id))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let rows = self
            .client
            .query("SELECT id FROM sales WHERE id = ANY($1)", &[&unknown])
            .await
            .map_err(classify)?;
        for row in rows {
            self.known_sales.insert(row.try_get(0).map_err(classify)?);
        }
        match unknown.iter().find(|id| !self.known_sales.contains(id)) {
            Some(missing) => Err(ApplyError::Malformed(format!(
                "order for sale {missing}, which does not exist"
            ))),
            None => Ok(()),
        }
    }

    async fn upsert(&self, orders: &[&Order]) -> Result<u64, tokio_postgres::Error> {
        let ids: Vec<_> = orders.iter().map(|o| o.id).collect();
        let sales: Vec<_> = orders.iter().map(|o| o.sale_id).collect();
        let users: Vec<_> = orders.iter().map(|o| o.user_id).collect();
        let qty: Vec<i32> = orders
            .iter()
            .map(|o| i32::try_from(o.quantity).unwrap_or(i32::MAX))
            .collect();
        let status: Vec<&str> = orders.iter().map(|o| o.status.as_str()).collect();
        let keys: Vec<Option<&str>> = orders
            .iter()
            .map(|o| o.idempotency_key.as_deref())
            .collect();
        let created: Vec<_> = orders.iter().map(|o| o.created_at).collect();
        let expires: Vec<_> = orders.iter().map(|o| o.expires_at).collect();
        let paid: Vec<_> = orders.iter().map(|o| o.paid_at).collect();
        let closed: Vec<_> = orders.iter().map(|o| o.closed_at).collect();
        self.client
            .execute(
                &self.upsert,
                &[
                    &ids, &sales, &users, &qty, &status, &keys, &created, &expires, &paid, &closed,
                ],
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::domain::order::OrderStatus;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let order = Order {
            id: Uuid::now_v7(),
            sale_id: Uuid::now_v7(),
            user_id: Uuid::new_v4(),
            quantity: 2,
            status: OrderStatus::Reserved,
            created_at: Utc::now(),
            expires_at: Utc::now(),
            paid_at: None,
            closed_at: None,
            idempotency_key: Some("k".into()),
        };
        let entries = vec![LogEntry::Reserve { order }];
        let refs: Vec<&LogEntry> = entries.iter().collect();
        let msg = decode(&encode(&refs)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(msg.entries, entries);
        let other = String::from_utf8(encode(&refs))
            .unwrap_or_default()
            .replacen("\"v\":1", "\"v\":99", 1);
        assert!(matches!(
            decode(other.as_bytes()),
            Err(ApplyError::Malformed(_))
        ));
        assert!(matches!(decode(b"not json"), Err(ApplyError::Malformed(_))));
        let extra_field = String::from_utf8(encode(&refs))
            .unwrap_or_default()
            .replacen("\"op\":\"reserve\"", "\"op\":\"reserve\",\"why\":1", 1);
        assert!(extra_field.contains("\"why\""));
        assert!(matches!(
            decode(extra_field.as_bytes()),
            Err(ApplyError::Malformed(_))
        ));
        assert!(matches!(
            decode(br#"{"v":1,"entries":[{"op":"teleport"}]}"#),
            Err(ApplyError::Malformed(_))
        ));
    }
}
