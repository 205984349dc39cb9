//! The order log's entries and how a message is applied to PostgreSQL.
//!
//! One RabbitMQ message carries a batch of entries (group commit). Its bytes
//! are [`wire`]'s business: a versioned format of its own, so that what
//! waits in the queue across an upgrade never depends on the API's types. A
//! writer refuses a version it does not know (to the dead-letter queue)
//! rather than guess.
//!
//! Every entry carries the whole order in its new state, and is applied as
//! one upsert keyed on the order id that only ever moves an order *out of*
//! `reserved`. So applying is idempotent (a redelivered message changes
//! nothing) and order-independent: with several writers a payment may reach
//! PostgreSQL before its reservation, and the row still ends `paid`.

mod wire;

use crate::domain::order::Order;

pub use wire::VERSION as LOG_SCHEMA_VERSION;

/// A decoded order-log message: its entries, in the order they were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogMessage {
    pub entries: Vec<LogEntry>,
}

/// One change to the orders table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// A new reservation (status `reserved`).
    Reserve { order: Order },
    /// A reservation paid, cancelled or expired (the order in its new state).
    Transition { order: Order },
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

    pub fn is_transition(&self) -> bool {
        matches!(self, LogEntry::Transition { .. })
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

/// One message for a batch, in the current wire version, serialised from
/// references (no copy of the orders).
pub fn encode(entries: &[&LogEntry]) -> Vec<u8> {
    wire::encode(entries.iter().map(|e| match e {
        LogEntry::Reserve { order } => (wire::Op::Reserve, order),
        LogEntry::Transition { order } => (wire::Op::Transition, order),
    }))
}

/// Reads a message of any version this server knows.
pub fn decode(bytes: &[u8]) -> Result<LogMessage, ApplyError> {
    let entries = wire::decode(bytes)
        .map_err(ApplyError::Malformed)?
        .into_iter()
        .map(|(op, order)| match op {
            wire::Op::Reserve => LogEntry::Reserve { order },
            wire::Op::Transition => LogEntry::Transition { order },
        })
        .collect();
    Ok(LogMessage { entries })
}

/// Errors in the data itself (bad values, constraint violations) will fail
/// the same way every time; anything else (connection, serialization,
/// deadlock, a statement cancelled by its time-out) may pass on a retry.
///
/// A unique violation is one of them: the upsert's `ON CONFLICT (id)` takes
/// every replay of an order, so what is left is a second order for one
/// (sale, buyer, idempotency key), which no retry will ever write.
fn classify(e: tokio_postgres::Error) -> ApplyError {
    match e.code() {
        Some(code) if code.code().starts_with("22") || code.code().starts_with("23") => {
            ApplyError::Malformed(e.to_string())
        }
        _ => ApplyError::Transient(e),
    }
}

/// A writer's session with PostgreSQL: its connection, the upsert prepared
/// once, and the sales it has already seen exist (with their price, for the
/// v1 entries that carry none).
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
    known_sales: std::collections::HashMap<uuid::Uuid, (i64, String)>,
}

/// The one statement every order-log entry is applied with.
pub(crate) const UPSERT_ORDERS: &str = "INSERT INTO orders (id, sale_id, user_id, quantity, status, idempotency_key, created_at, expires_at, paid_at, closed_at, price_cents, currency) \
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[], \
                          $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::int8[], $12::text[]) \
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
        // Entries of wire v1 carry no price: their sale's price now.
        let priced: Vec<Order> = orders
            .iter()
            .filter(|o| o.currency.is_empty())
            .filter_map(|o| {
                let (price, currency) = self.known_sales.get(&o.sale_id)?;
                Some(Order {
                    price_cents: *price,
                    currency: currency.clone(),
                    ..(*o).clone()
                })
            })
            .collect();
        let mut orders: Vec<&Order> = orders
            .into_iter()
            .filter(|o| !o.currency.is_empty())
            .chain(&priced)
            .collect();
        orders.sort_unstable_by_key(|o| o.id);
        upsert(&self.client, &self.upsert, &orders)
            .await
            .map_err(classify)
    }

    /// Refuses a message naming a sale that does not exist.
    async fn check_sales(&mut self, orders: &[&Order]) -> Result<(), ApplyError> {
        let mut unknown: Vec<uuid::Uuid> = orders
            .iter()
            .map(|o| o.sale_id)
            .filter(|id| !self.known_sales.contains_key(id))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let rows = self
            .client
            .query(
                "SELECT id, price_cents, currency FROM sales WHERE id = ANY($1)",
                &[&unknown],
            )
            .await
            .map_err(classify)?;
        for row in rows {
            let id = row.try_get(0).map_err(classify)?;
            let price = (
                row.try_get(1).map_err(classify)?,
                row.try_get(2).map_err(classify)?,
            );
            self.known_sales.insert(id, price);
        }
        match unknown.iter().find(|id| !self.known_sales.contains_key(id)) {
            Some(missing) => Err(ApplyError::Malformed(format!(
                "order for sale {missing}, which does not exist"
            ))),
            None => Ok(()),
        }
    }
}

/// Applies `orders` (each in its latest state, each id once) with
/// [`UPSERT_ORDERS`], prepared or not.
pub(crate) async fn upsert<S>(
    client: &tokio_postgres::Client,
    statement: &S,
    orders: &[&Order],
) -> Result<u64, tokio_postgres::Error>
where
    S: tokio_postgres::ToStatement + ?Sized,
{
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
    let price: Vec<i64> = orders.iter().map(|o| o.price_cents).collect();
    let currency: Vec<&str> = orders.iter().map(|o| o.currency.as_str()).collect();
    client
        .execute(
            statement,
            &[
                &ids, &sales, &users, &qty, &status, &keys, &created, &expires, &paid, &closed,
                &price, &currency,
            ],
        )
        .await
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::domain::order::OrderStatus;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn uuid(s: &str) -> Uuid {
        Uuid::parse_str(s).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fixed reservation and its payment.
    fn entries() -> Vec<LogEntry> {
        let reserved = Order {
            id: uuid("0192f0c4-0000-7000-8000-000000000001"),
            sale_id: uuid("0192f0c4-0000-7000-8000-0000000000aa"),
            user_id: uuid("5f0c7f4e-1111-4222-8333-444455556666"),
            quantity: 2,
            status: OrderStatus::Reserved,
            created_at: at("2026-11-22T10:00:00.123456Z"),
            expires_at: at("2026-11-22T10:10:00.123456Z"),
            paid_at: None,
            closed_at: None,
            idempotency_key: Some("press-1".into()),
            price_cents: 12_900,
            currency: "EUR".into(),
        };
        let paid = Order {
            status: OrderStatus::Paid,
            paid_at: Some(at("2026-11-22T10:01:00Z")),
            idempotency_key: None,
            ..reserved.clone()
        };
        vec![
            LogEntry::Reserve { order: reserved },
            LogEntry::Transition { order: paid },
        ]
    }

    /// The bytes of version 2, pinned: a change here breaks every message
    /// waiting in a queue across an upgrade, so it must be a new version.
    const GOLDEN_V2: &str = concat!(
        r#"{"v":2,"entries":["#,
        r#"{"op":"reserve","order":{"id":"0192f0c4-0000-7000-8000-000000000001","sale":"0192f0c4-0000-7000-8000-0000000000aa","user":"5f0c7f4e-1111-4222-8333-444455556666","qty":2,"status":"reserved","created_us":1795341600123456,"expires_us":1795342200123456,"paid_us":null,"closed_us":null,"key":"press-1","price":12900,"cur":"EUR"}},"#,
        r#"{"op":"transition","order":{"id":"0192f0c4-0000-7000-8000-000000000001","sale":"0192f0c4-0000-7000-8000-0000000000aa","user":"5f0c7f4e-1111-4222-8333-444455556666","qty":2,"status":"paid","created_us":1795341600123456,"expires_us":1795342200123456,"paid_us":1795341660000000,"closed_us":null,"key":null,"price":12900,"cur":"EUR"}}"#,
        r#"]}"#
    );

    /// A message as version 1 wrote it (the API's field names of the time).
    const GOLDEN_V1: &str = concat!(
        r#"{"v":1,"entries":["#,
        r#"{"op":"reserve","order":{"id":"0192f0c4-0000-7000-8000-000000000001","sale_id":"0192f0c4-0000-7000-8000-0000000000aa","user_id":"5f0c7f4e-1111-4222-8333-444455556666","quantity":2,"status":"reserved","created_at":"2026-11-22T10:00:00.123456Z","expires_at":"2026-11-22T10:10:00.123456Z","paid_at":null,"closed_at":null,"idempotency_key":"press-1"}},"#,
        r#"{"op":"transition","order":{"id":"0192f0c4-0000-7000-8000-000000000001","sale_id":"0192f0c4-0000-7000-8000-0000000000aa","user_id":"5f0c7f4e-1111-4222-8333-444455556666","quantity":2,"status":"paid","created_at":"2026-11-22T10:00:00.123456Z","expires_at":"2026-11-22T10:10:00.123456Z","paid_at":"2026-11-22T10:01:00Z","closed_at":null}}"#,
        r#"]}"#
    );

    #[test]
    fn writes_the_pinned_bytes_of_version_2() {
        let entries = entries();
        let refs: Vec<&LogEntry> = entries.iter().collect();
        let bytes = encode(&refs);
        assert_eq!(String::from_utf8_lossy(&bytes), GOLDEN_V2);
        let back = decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.entries, entries);
    }

    #[test]
    fn reads_messages_of_version_1() {
        let msg = decode(GOLDEN_V1.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        // v1 carried no price: read as none, filled from the sale when applied.
        let unpriced: Vec<LogEntry> = entries()
            .into_iter()
            .map(|e| {
                let unpriced = |o: &Order| Order {
                    price_cents: 0,
                    currency: String::new(),
                    ..o.clone()
                };
                match e {
                    LogEntry::Reserve { order } => LogEntry::Reserve {
                        order: unpriced(&order),
                    },
                    LogEntry::Transition { order } => LogEntry::Transition {
                        order: unpriced(&order),
                    },
                }
            })
            .collect();
        assert_eq!(msg.entries, unpriced);
    }

    #[test]
    fn refuses_unknown_versions_fields_and_ops() {
        let malformed =
            |text: &str| matches!(decode(text.as_bytes()), Err(ApplyError::Malformed(_)));
        assert!(malformed(&GOLDEN_V2.replacen(r#""v":2"#, r#""v":99"#, 1)));
        assert!(malformed(&GOLDEN_V2.replacen(r#""v":2"#, r#""v":1"#, 1)));
        assert!(malformed("not json"));
        assert!(malformed(&GOLDEN_V2.replacen(
            r#""qty":2"#,
            r#""qty":2,"why":1"#,
            1
        )));
        assert!(malformed(&GOLDEN_V2.replacen(
            r#""op":"reserve""#,
            r#""op":"reserve","why":1"#,
            1
        )));
        assert!(malformed(r#"{"v":2,"entries":[{"op":"teleport"}]}"#));
        assert!(malformed(&GOLDEN_V2.replacen(
            "1795341600123456",
            "9223372036854775807",
            1
        )));
        assert!(malformed(&GOLDEN_V1.replacen(
            r#""quantity":2"#,
            r#""quantity":2,"why":1"#,
            1
        )));
    }
}
