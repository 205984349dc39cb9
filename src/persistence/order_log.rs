//! The order log's message format and how a message is applied to PostgreSQL.
//!
//! One RabbitMQ message carries a batch of entries (group commit). Messages
//! carry a schema version `v`; a writer refuses a version it does not know
//! (to the dead-letter queue) rather than guess. Applying a message is
//! idempotent: inserts are keyed on the order id (`ON CONFLICT DO NOTHING`),
//! so a redelivered message changes nothing.

use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

use crate::domain::order::Order;

pub const LOG_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogMessage {
    pub v: u32,
    pub entries: Vec<LogEntry>,
}

/// One change to the orders table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogEntry {
    /// A new reservation (status `reserved`).
    Reserve { order: Order },
}

impl LogEntry {
    pub fn order_id(&self) -> uuid::Uuid {
        match self {
            LogEntry::Reserve { order } => order.id,
        }
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

pub fn encode(entries: &[LogEntry]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        v: u32,
        entries: &'a [LogEntry],
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

/// Applies every entry of a message in one transaction; returns the rows
/// inserted (a replayed message inserts none).
pub async fn apply(
    client: &mut tokio_postgres::Client,
    msg: &LogMessage,
) -> Result<u64, ApplyError> {
    let tx = client.transaction().await.map_err(classify)?;
    let reserves: Vec<&Order> = msg
        .entries
        .iter()
        .map(|e| match e {
            LogEntry::Reserve { order } => order,
        })
        .collect();
    let inserted = insert_reserved(&tx, &reserves).await.map_err(classify)?;
    tx.commit().await.map_err(classify)?;
    Ok(inserted)
}

/// One statement for the whole batch: arrays unnested into rows.
async fn insert_reserved<C: GenericClient>(
    client: &C,
    orders: &[&Order],
) -> Result<u64, tokio_postgres::Error> {
    if orders.is_empty() {
        return Ok(0);
    }
    let ids: Vec<_> = orders.iter().map(|o| o.id).collect();
    let sales: Vec<_> = orders.iter().map(|o| o.sale_id).collect();
    let users: Vec<_> = orders.iter().map(|o| o.user_id).collect();
    let qty: Vec<i32> = orders
        .iter()
        .map(|o| i32::try_from(o.quantity).unwrap_or(i32::MAX))
        .collect();
    let keys: Vec<Option<&str>> = orders
        .iter()
        .map(|o| o.idempotency_key.as_deref())
        .collect();
    let created: Vec<_> = orders.iter().map(|o| o.created_at).collect();
    let expires: Vec<_> = orders.iter().map(|o| o.expires_at).collect();
    client
        .execute(
            "INSERT INTO orders (id, sale_id, user_id, quantity, status, idempotency_key, created_at, expires_at) \
             SELECT i, s, u, q, 'reserved', k, c, e \
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::timestamptz[], $7::timestamptz[]) \
               AS t(i, s, u, q, k, c, e) \
             ON CONFLICT DO NOTHING",
            &[&ids, &sales, &users, &qty, &keys, &created, &expires],
        )
        .await
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
            idempotency_key: Some("k".into()),
        };
        let entries = vec![LogEntry::Reserve { order }];
        let msg = decode(&encode(&entries)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(msg.entries, entries);
        let other = String::from_utf8(encode(&entries))
            .unwrap_or_default()
            .replacen("\"v\":1", "\"v\":99", 1);
        assert!(matches!(
            decode(other.as_bytes()),
            Err(ApplyError::Malformed(_))
        ));
        assert!(matches!(decode(b"not json"), Err(ApplyError::Malformed(_))));
        assert!(matches!(
            decode(br#"{"v":1,"entries":[{"op":"teleport"}]}"#),
            Err(ApplyError::Malformed(_))
        ));
    }
}
