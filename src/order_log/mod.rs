//! The order log: every decision a stock actor makes, made durable in
//! batches (group commit) before anyone is told yes.
//!
//! Its parts, by role:
//! - [`wire`]: the bytes of a message that waits in RabbitMQ (services mode),
//!   a versioned format of its own, never the API's types;
//! - [`sink`]: the group commit. Stock actors hand entries to an
//!   [`sink::OrderPublisher`]; one task batches them and appends each batch
//!   to a [`sink::Sink`]: RabbitMQ (a persistent message, confirmed) or
//!   SQLite (one transaction, committed with a full sync). The confirm is
//!   what releases the 201s. Entries in doubt are decided in the store;
//! - [`writer`]: services mode only, the pool that moves messages from
//!   RabbitMQ into PostgreSQL;
//! - [`drain`]: recovery, services mode only: the whole queue into
//!   PostgreSQL before any sale opens (in embedded mode a committed batch is
//!   already in the store);
//! - the store ([`crate::persistence::store`]), where entries end.
//!
//! Every entry carries the whole order in its new state, and is applied as
//! one upsert keyed on the order id that only ever moves an order *out of*
//! `reserved`. So applying is idempotent (a redelivered message changes
//! nothing) and order-independent: with several writers a payment may reach
//! the store before its reservation, and the row still ends `paid`.

pub mod drain;
pub mod sink;
mod wire;
pub mod writer;

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
    Transient(String),
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

    /// The bytes of version 3, pinned field by field: a change here breaks
    /// every message waiting in a queue across an upgrade, so it must be a
    /// new version.
    const GOLDEN_V3: &str = concat!(
        "00465303", // head: NUL, "FS", version 3
        "02000000", // two entries
        // the reservation: op, status, optional fields (key)
        "000004",
        "0192f0c4000070008000000000000001", // id
        "0192f0c40000700080000000000000aa", // sale
        "5f0c7f4e111142228333444455556666", // user
        "02000000",                         // qty
        "406a538ada600600",                 // created_us 1795341600123456
        "40b016aeda600600",                 // expires_us 1795342200123456
        "6432000000000000",                 // price 12900
        "0300455552",                       // "EUR"
        "070070726573732d31",               // key "press-1"
        // the payment: op, status, optional fields (paid time)
        "010101",
        "0192f0c4000070008000000000000001",
        "0192f0c40000700080000000000000aa",
        "5f0c7f4e111142228333444455556666",
        "02000000",
        "406a538ada600600",
        "40b016aeda600600",
        "000fe58dda600600", // paid_us 1795341660000000
        "6432000000000000",
        "0300455552",
    );

    /// A message as version 2 wrote it (JSON, short field names).
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
    fn writes_the_pinned_bytes_of_version_3() {
        let entries = entries();
        let refs: Vec<&LogEntry> = entries.iter().collect();
        let bytes = encode(&refs);
        assert_eq!(hex::encode(&bytes), GOLDEN_V3);
        let back = decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.entries, entries);
    }

    #[test]
    fn reads_messages_of_version_2() {
        let msg = decode(GOLDEN_V2.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(msg.entries, entries());
    }

    #[test]
    fn refuses_version_3_messages_that_do_not_add_up() {
        let golden = hex::decode(GOLDEN_V3).unwrap_or_else(|e| panic!("{e}"));
        let malformed = |bytes: &[u8]| matches!(decode(bytes), Err(ApplyError::Malformed(_)));
        let with = |at: usize, byte: u8| {
            let mut b = golden.clone();
            b[at] = byte;
            b
        };
        // Cut anywhere, or with a byte too many.
        for end in 4..golden.len() {
            assert!(malformed(&golden[..end]), "cut at {end}");
        }
        assert!(malformed(&[golden.as_slice(), &[0]].concat()));
        // A count the bytes cannot hold, an unknown op, status or flag.
        assert!(malformed(&with(4, 0xff)));
        assert!(malformed(&with(4, 1)));
        assert!(malformed(&with(8, 2)));
        assert!(malformed(&with(9, 4)));
        assert!(malformed(&with(10, 0x0c)));
        // A created time out of range (its top byte); a key that is not
        // UTF-8 (its first byte).
        assert!(malformed(&with(70, 0x7f)));
        assert!(malformed(&with(94, 0xff)));
        // The same bytes with sane values still read.
        assert!(!malformed(&with(94, b'q')));
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
