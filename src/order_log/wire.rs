//! The order log's bytes: a format of its own, versioned, never the API type.
//!
//! Messages outlive the process that wrote them (they wait in RabbitMQ across
//! a crash or an upgrade), so what is written here is a contract with every
//! later version of the server: renaming a field of the API's `Order` must
//! not change a byte of it. A writer reads every version it knows and refuses
//! (to the dead-letter queue) one it does not.
//!
//! - **v3** (written now): binary, little-endian. A 4-byte head (a NUL,
//!   which no JSON text starts with, then `FS` and the version byte 3), the
//!   entry count (u32), then per entry: op (u8: 0 reserve, 1 transition),
//!   status (u8: 0 reserved, 1 paid, 2 cancelled, 3 expired), which
//!   optional fields follow (u8: 1 paid time, 2 closed time, 4 key), the
//!   order, sale and user ids (16 bytes each), quantity (u32), created and
//!   expires times (i64 µs since the Unix epoch), the paid and closed times
//!   when present, the unit price (i64), the currency (u16 length, UTF-8)
//!   and the key when present (u16 length, UTF-8). About a third of v2's
//!   bytes, and neither side formats or parses text: measured on the
//!   reservation benchmark, JSON was about a twentieth of the server's CPU
//!   (the publisher writing it, the order writers reading it).
//! - **v2** (read only; written until v3): JSON, short field names,
//!   times as integer microseconds since the Unix epoch (PostgreSQL keeps
//!   microseconds), the status as its own enum, the unit price and currency
//!   fixed at reservation.
//!   `{"v":2,"entries":[{"op":"reserve","order":{"id","sale","user","qty","status","created_us","expires_us","paid_us","closed_us","key","price","cur"}}]}`
//! - **v1** (read only): the entry's order spelled as the API spelled it then,
//!   times as RFC 3339 strings, no price: such an order is read with an empty
//!   currency, and the writer gives it its sale's price (`OrderStore`).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::order::{Order, OrderStatus};

/// The version this server writes.
pub const VERSION: u32 = 3;

/// The head of a v3 message.
const V3_HEAD: [u8; 4] = [0, b'F', b'S', 3];
/// The fewest bytes a v3 entry takes (no optional field, empty currency).
const V3_MIN_ENTRY: usize = 3 + 3 * 16 + 4 + 2 * 8 + 8 + 2;
const HAS_PAID: u8 = 1;
const HAS_CLOSED: u8 = 2;
const HAS_KEY: u8 = 4;

/// An order's status on the wire (kept apart from the API's enum); in v3
/// its byte is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
enum Status {
    Reserved = 0,
    Paid = 1,
    Cancelled = 2,
    Expired = 3,
}

impl Status {
    const ALL: [Status; 4] = [
        Status::Reserved,
        Status::Paid,
        Status::Cancelled,
        Status::Expired,
    ];
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

/// In v3 its byte is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub(super) enum Op {
    Reserve = 0,
    Transition = 1,
}

impl Op {
    const ALL: [Op; 2] = [Op::Reserve, Op::Transition];
}

/// A v2 order.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderV2 {
    id: Uuid,
    sale: Uuid,
    user: Uuid,
    qty: u32,
    status: Status,
    created_us: i64,
    expires_us: i64,
    paid_us: Option<i64>,
    closed_us: Option<i64>,
    key: Option<String>,
    price: i64,
    cur: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryV2 {
    op: Op,
    order: OrderV2,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageV2 {
    v: u32,
    entries: Vec<EntryV2>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64, field: &str) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| format!("{field} {us} is out of range"))
}

/// One message (v3) for a batch of entries, from references.
pub(super) fn encode<'a>(entries: impl Iterator<Item = (Op, &'a Order)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.size_hint().0 * (V3_MIN_ENTRY + 8));
    out.extend_from_slice(&V3_HEAD);
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut count: u32 = 0;
    for (op, o) in entries {
        count += 1;
        let present = o.paid_at.map_or(0, |_| HAS_PAID)
            | o.closed_at.map_or(0, |_| HAS_CLOSED)
            | o.idempotency_key.as_ref().map_or(0, |_| HAS_KEY);
        out.extend_from_slice(&[op as u8, Status::from(o.status) as u8, present]);
        for id in [o.id, o.sale_id, o.user_id] {
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(&o.quantity.to_le_bytes());
        for t in [
            Some(o.created_at),
            Some(o.expires_at),
            o.paid_at,
            o.closed_at,
        ]
        .into_iter()
        .flatten()
        {
            out.extend_from_slice(&micros(t).to_le_bytes());
        }
        out.extend_from_slice(&o.price_cents.to_le_bytes());
        put_text(&mut out, &o.currency);
        if let Some(k) = &o.idempotency_key {
            put_text(&mut out, k);
        }
    }
    out[4..8].copy_from_slice(&count.to_le_bytes());
    out
}

/// A string with its u16 length. Keys (128 bytes at most) and currencies
/// (3) are validated long before they reach the log; a longer one would be
/// cut at a character boundary rather than corrupt the message.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(usize::from(u16::MAX));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// Reads a v3 message strictly: every byte accounted for.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!("message ends inside {what}"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn uuid(&mut self, what: &str) -> Result<Uuid, String> {
        Ok(Uuid::from_bytes(self.array(what)?))
    }

    fn time(&mut self, what: &str) -> Result<DateTime<Utc>, String> {
        from_micros(i64::from_le_bytes(self.array(what)?), what)
    }

    fn text(&mut self, what: &str) -> Result<String, String> {
        let len = u16::from_le_bytes(self.array(what)?);
        let bytes = self.take(usize::from(len), what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn decode_v3(bytes: &[u8]) -> Result<Vec<(Op, Order)>, String> {
    let mut r = Reader { bytes };
    r.take(V3_HEAD.len(), "the head")?;
    let count = u32::from_le_bytes(r.array("the entry count")?) as usize;
    // The count cannot claim more entries than the bytes can hold.
    if count > r.bytes.len() / V3_MIN_ENTRY {
        return Err(format!(
            "{count} entries claimed in {} bytes",
            r.bytes.len()
        ));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let op = r.u8("op")?;
        let op = Op::ALL
            .into_iter()
            .find(|o| *o as u8 == op)
            .ok_or_else(|| format!("unknown op {op}"))?;
        let status = r.u8("status")?;
        let status = Status::ALL
            .into_iter()
            .find(|s| *s as u8 == status)
            .ok_or_else(|| format!("unknown status {status}"))?;
        let present = r.u8("flags")?;
        if present & !(HAS_PAID | HAS_CLOSED | HAS_KEY) != 0 {
            return Err(format!("unknown flags {present:#04x}"));
        }
        let id = r.uuid("id")?;
        let sale_id = r.uuid("sale")?;
        let user_id = r.uuid("user")?;
        let quantity = u32::from_le_bytes(r.array("qty")?);
        let created_at = r.time("created_us")?;
        let expires_at = r.time("expires_us")?;
        let paid_at = (present & HAS_PAID != 0)
            .then(|| r.time("paid_us"))
            .transpose()?;
        let closed_at = (present & HAS_CLOSED != 0)
            .then(|| r.time("closed_us"))
            .transpose()?;
        let price_cents = i64::from_le_bytes(r.array("price")?);
        let currency = r.text("cur")?;
        let idempotency_key = (present & HAS_KEY != 0)
            .then(|| r.text("key"))
            .transpose()?;
        entries.push((
            op,
            Order {
                id,
                sale_id,
                user_id,
                quantity,
                status: status.into(),
                created_at,
                expires_at,
                paid_at,
                closed_at,
                idempotency_key,
                price_cents,
                currency,
            },
        ));
    }
    if !r.bytes.is_empty() {
        return Err(format!("{} bytes after the last entry", r.bytes.len()));
    }
    Ok(entries)
}

/// Reads a message of any version this server knows, as (op, order) pairs.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<(Op, Order)>, String> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    // Binary (v3) starts with its head; JSON (v1, v2) names its version.
    if bytes.starts_with(&V3_HEAD) {
        return decode_v3(bytes);
    }
    let version = if bytes.starts_with(br#"{"v":2,"#) {
        2
    } else {
        serde_json::from_slice::<Version>(bytes)
            .map_err(|e| e.to_string())?
            .v
    };
    match version {
        2 => decode_v2(bytes),
        1 => decode_v1(bytes),
        v => Err(format!(
            "schema version {v} (this server reads 1, 2 and 3, and writes {VERSION})"
        )),
    }
}

fn decode_v2(bytes: &[u8]) -> Result<Vec<(Op, Order)>, String> {
    let msg: MessageV2 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
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
