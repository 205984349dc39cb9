//! PostgreSQL, the store of services mode: users, sales and orders.
//!
//! One pooled [`PostgresStore`] serves request handlers and recovery through
//! [`Store`]; [`LogApplier`] is an order writer's own session, applying the
//! order log. Every statement PostgreSQL runs is in this file.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use tokio_postgres::{error::SqlState, NoTls, Row};
use uuid::Uuid;

use super::store::{latest_states, EventClaim, Store, StoreError};
use super::Unreachable;
use crate::config::DatabaseSettings;
use crate::domain::order::{Order, OrderStatus};
use crate::domain::sale::{Sale, SaleSpec};
use crate::domain::sale_book::{BookRestore, SaleBook};
use crate::order_log::{ApplyError, LogEntry, LogMessage};

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

impl From<bb8::RunError<tokio_postgres::Error>> for StoreError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::User(e) => classify(e),
            bb8::RunError::TimedOut => StoreError::Unavailable,
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e)
    }
}

/// A unique violation names what it guards; a failed connection (no
/// SQLSTATE) or a class that says the database is away or busy for now
/// (connection exceptions, insufficient resources, operator intervention
/// such as `statement_timeout`, transaction rollbacks) is `Unavailable`;
/// the rest is a fault of the statement.
fn classify(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let constraint = e
            .as_db_error()
            .and_then(|d| d.constraint())
            .unwrap_or("unknown")
            .to_owned();
        return StoreError::Duplicate(constraint);
    }
    let passing = |code: &str| ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c));
    if e.is_closed() || e.code().is_none_or(|c| passing(c.code())) {
        tracing::warn!(error = %e, "PostgreSQL unreachable");
        return StoreError::Unavailable;
    }
    StoreError::Engine(e.to_string())
}

/// The pooled PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// How long a caller waits for a statement: PostgreSQL cancels it at
    /// `database.statement_timeout_ms`; this is a little longer, for a
    /// connection that stalls without an answer.
    deadline: Duration,
}

/// The connection settings of every session the server opens: the URL, the
/// connect time-out and `statement_timeout`, so that PostgreSQL itself
/// cancels a statement that stalls (on a lock, say) rather than letting it
/// commit long after its caller gave up.
pub fn session_config(
    settings: &DatabaseSettings,
) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::from_str(settings.url.expose_secret())?;
    config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
    let timeout = format!("-c statement_timeout={}", settings.statement_timeout_ms);
    let options = match config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {timeout}"),
        _ => timeout,
    };
    config.options(&options);
    Ok(config)
}

impl PostgresStore {
    /// Connects (creating the database first when configured to), applies the
    /// migrations and builds the pool.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, Unreachable> {
        let config = session_config(settings).map_err(|e| {
            Unreachable::new("PostgreSQL", "<invalid url>".into(), "database.url", e)
        })?;
        let address = describe(&config);
        let unreachable = |e: &dyn std::fmt::Display| {
            Unreachable::new("PostgreSQL", address.clone(), "database.url", e)
        };
        let timeout = Duration::from_millis(settings.connect_timeout_ms);
        if settings.create_if_missing {
            create_database_if_missing(&config, timeout)
                .await
                .map_err(|e| unreachable(&e))?;
        }
        run_migrations(&config).await.map_err(|e| unreachable(&e))?;
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = bb8::Pool::builder()
            .max_size(settings.pool_size)
            .connection_timeout(timeout)
            // A PING on every checkout costs a round trip per query; broken
            // connections are found by the query itself and replaced.
            .test_on_check_out(false)
            .build(manager)
            .await
            .map_err(|e| unreachable(&e))?;
        // The pool connects lazily; prove the database answers now.
        let db = PostgresStore {
            pool,
            deadline: Duration::from_millis(settings.statement_timeout_ms) + Duration::from_secs(1),
        };
        db.ping().await.map_err(|e| unreachable(&e))?;
        Ok(db)
    }

    /// Waits for `fut` at most the statement deadline.
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.deadline, fut)
            .await
            .unwrap_or(Err(StoreError::Unavailable))
    }

    async fn update_sale_unbounded(&self, sale: &Sale) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        let s = &sale.spec;
        conn.execute(
            "UPDATE sales SET name = $2, description = $3, price_cents = $4, currency = $5, \
             stock_total = $6, per_user_limit = $7, starts_at = $8, ends_at = $9, \
             reservation_ttl_secs = $10, paused = $11, updated_at = $12 WHERE id = $1",
            &[
                &sale.id,
                &s.name,
                &s.description,
                &s.price_cents,
                &s.currency,
                &to_i32(s.stock_total),
                &to_i32(s.per_user_limit),
                &s.starts_at,
                &s.ends_at,
                &to_i32(s.reservation_ttl_secs),
                &sale.paused,
                &sale.updated_at,
            ],
        )
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn restore_into(
        &self,
        sales: Vec<Sale>,
        only: Option<Uuid>,
    ) -> Result<HashMap<Uuid, SaleBook>, StoreError> {
        use futures_util::StreamExt;
        let mut books: HashMap<Uuid, BookRestore> = sales
            .into_iter()
            .map(|s| (s.id, BookRestore::new(s)))
            .collect();
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let sql = format!(
            "{ORDER_COLUMNS} WHERE ($1::uuid IS NULL OR sale_id = $1) AND status <> 'void'"
        );
        let rows = tx
            .query_raw(
                sql.as_str(),
                [&only as &(dyn tokio_postgres::types::ToSql + Sync)],
            )
            .await?;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = rows.next().await {
            if let Some(order) = order_from_row(&row?) {
                if let Some(book) = books.get_mut(&order.sale_id) {
                    book.add(&order);
                }
            }
        }
        tx.commit().await?;
        Ok(books.into_iter().map(|(id, b)| (id, b.finish())).collect())
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    /// Round trip to the database, for readiness.
    async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        conn.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn insert_user(
        &self,
        id: Uuid,
        username: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "INSERT INTO users (id, username, password_hash) VALUES ($1, $2, $3)",
            &[&id, &username, &password_hash],
        )
        .await
        .map_err(classify)?;
        Ok(())
    }

    /// The id and password hash of a user, if the username exists.
    async fn user_credentials(&self, username: &str) -> Result<Option<(Uuid, String)>, StoreError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                "SELECT id, password_hash FROM users WHERE username = $1",
                &[&username],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn insert_sale(&self, sale: &Sale) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        let s = &sale.spec;
        conn.execute(
            "INSERT INTO sales (id, name, description, price_cents, currency, stock_total, \
             per_user_limit, starts_at, ends_at, reservation_ttl_secs, paused, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            &[
                &sale.id,
                &s.name,
                &s.description,
                &s.price_cents,
                &s.currency,
                &to_i32(s.stock_total),
                &to_i32(s.per_user_limit),
                &s.starts_at,
                &s.ends_at,
                &to_i32(s.reservation_ttl_secs),
                &sale.paused,
                &sale.created_at,
                &sale.updated_at,
            ],
        )
        .await
        .map_err(classify)?;
        Ok(())
    }

    /// Writes a sale's editable fields and pause flag, within the statement
    /// deadline.
    async fn update_sale(&self, sale: &Sale) -> Result<(), StoreError> {
        self.bounded(self.update_sale_unbounded(sale)).await
    }

    /// Every sale, newest start first.
    async fn list_sales(&self) -> Result<Vec<Sale>, StoreError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(&format!("{SALE_COLUMNS} ORDER BY starts_at DESC, id"), &[])
            .await?;
        Ok(rows.iter().map(sale_from_row).collect())
    }

    /// Streams the rows (one sale's, when asked for one) in a transaction
    /// without the statement time-out: a large store takes longer to read.
    async fn restore_books(&self, sales: Vec<Sale>) -> Result<HashMap<Uuid, SaleBook>, StoreError> {
        let only = match sales.as_slice() {
            [one] => Some(one.id),
            _ => None,
        };
        self.restore_into(sales, only).await
    }

    /// One order, whoever owns it (callers check ownership).
    async fn order(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                &format!("{ORDER_COLUMNS} WHERE id = $1 AND status <> 'void'"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().and_then(order_from_row))
    }

    /// A user's orders, newest first, at most `limit`.
    async fn user_orders(&self, user_id: Uuid, limit: i64) -> Result<Vec<Order>, StoreError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "{ORDER_COLUMNS} WHERE user_id = $1 AND status <> 'void' \
                     ORDER BY created_at DESC LIMIT $2"
                ),
                &[&user_id, &limit],
            )
            .await?;
        Ok(rows.iter().filter_map(order_from_row).collect())
    }

    /// Writes orders in their latest state straight into PostgreSQL, as the
    /// order writers apply log entries (the same idempotent, order-independent
    /// upsert): for decisions whose publish to the log failed.
    async fn write_orders(&self, orders: &[&Order]) -> Result<(), StoreError> {
        self.bounded(async {
            let conn = self.pool.get().await?;
            let orders = latest_states(orders.iter().copied());
            upsert(&conn, UPSERT_ORDERS, &orders).await?;
            Ok(())
        })
        .await
    }

    /// The status PostgreSQL holds for each of `ids` that it has.
    async fn order_statuses(
        &self,
        ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, String>, StoreError> {
        self.bounded(async {
            let conn = self.pool.get().await?;
            let rows = conn
                .query("SELECT id, status FROM orders WHERE id = ANY($1)", &[&ids])
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    /// Decides reservations whose publish was never confirmed, with one
    /// statement: an order PostgreSQL has stands; for every other one a
    /// `void` row takes its id, so that a late copy of the reservation can
    /// never be inserted. Returns the ids voided (release their units).
    async fn void_absent(&self, orders: &[&Order]) -> Result<Vec<Uuid>, StoreError> {
        self.bounded(async {
            let conn = self.pool.get().await?;
            let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
            let sales: Vec<Uuid> = orders.iter().map(|o| o.sale_id).collect();
            let users: Vec<Uuid> = orders.iter().map(|o| o.user_id).collect();
            let qty: Vec<i32> = orders
                .iter()
                .map(|o| i32::try_from(o.quantity).unwrap_or(i32::MAX))
                .collect();
            let created: Vec<DateTime<Utc>> = orders.iter().map(|o| o.created_at).collect();
            let expires: Vec<DateTime<Utc>> = orders.iter().map(|o| o.expires_at).collect();
            let rows = conn
                .query(
                    "INSERT INTO orders (id, sale_id, user_id, quantity, status, created_at, expires_at, closed_at) \
                     SELECT id, sale_id, user_id, quantity, 'void', created_at, expires_at, now() \
                     FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::timestamptz[], $6::timestamptz[]) \
                       AS t(id, sale_id, user_id, quantity, created_at, expires_at) \
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    &[&ids, &sales, &users, &qty, &created, &expires],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
    }

    /// Claims a payment webhook event for handling, or tells how an earlier
    /// delivery of it went.
    async fn claim_payment_event(
        &self,
        event_id: &str,
        order_id: Uuid,
    ) -> Result<EventClaim, StoreError> {
        self.bounded(async {
            let conn = self.pool.get().await?;
            let inserted = conn
                .execute(
                    "INSERT INTO payment_events (event_id, order_id) VALUES ($1, $2) \
                     ON CONFLICT (event_id) DO NOTHING",
                    &[&event_id, &order_id],
                )
                .await
                .map_err(classify)?;
            if inserted == 1 {
                return Ok(EventClaim::New);
            }
            let row = conn
                .query_opt(
                    "SELECT result FROM payment_events WHERE event_id = $1",
                    &[&event_id],
                )
                .await?;
            Ok(match row.and_then(|r| r.get::<_, Option<String>>(0)) {
                Some(result) => EventClaim::Done(result),
                None => EventClaim::InProgress,
            })
        })
        .await
    }

    /// Records how a claimed event was handled.
    async fn finish_payment_event(&self, event_id: &str, result: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let conn = self.pool.get().await?;
            conn.execute(
                "UPDATE payment_events SET result = $2 WHERE event_id = $1",
                &[&event_id, &result],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Gives a claimed event up (its handling failed): a later delivery
    /// handles it afresh.
    async fn forget_payment_event(&self, event_id: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let conn = self.pool.get().await?;
            conn.execute(
                "DELETE FROM payment_events WHERE event_id = $1 AND result IS NULL",
                &[&event_id],
            )
            .await?;
            Ok(())
        })
        .await
    }
}

/// Errors in the data itself (bad values, constraint violations) will fail
/// the same way every time; anything else (connection, serialization,
/// deadlock, a statement cancelled by its time-out) may pass on a retry.
///
/// A unique violation is one of them: the upsert's `ON CONFLICT (id)` takes
/// every replay of an order, so what is left is a second order for one
/// (sale, buyer, idempotency key), which no retry will ever write.
fn classify_apply(e: tokio_postgres::Error) -> ApplyError {
    match e.code() {
        Some(code) if code.code().starts_with("22") || code.code().starts_with("23") => {
            ApplyError::Malformed(e.to_string())
        }
        _ => ApplyError::Transient(e.to_string()),
    }
}

/// A writer's session with PostgreSQL: its connection, the upsert prepared
/// once, and the sales it has already seen exist (with their price, for the
/// v1 entries that carry none).
///
/// Applying a message is one prepared statement (atomic on its own, so no
/// explicit transaction). A set of messages holding only new reservations,
/// nearly every set in a rush, is first tried as one binary `COPY` into
/// `orders`: measured on the benchmark machine (120 rows a batch, the
/// shipped indexes) it costs PostgreSQL about half the CPU per row of the
/// upsert (9-10 µs against 18-19 µs), where a `COPY` into a staging table
/// followed by the upsert saved only 5%. A `COPY` takes no `ON CONFLICT`:
/// when it meets an order already there (a redelivery after a crash, a late
/// copy of a voided reservation, an order whose payment landed first) it
/// fails whole, writing nothing, and the set is applied again with the
/// upsert, which decides each row as always. `orders.sale_id` has no
/// foreign key (migration V3): every order of a hot sale would take a
/// `FOR KEY SHARE` lock on the same `sales` row, and with several writers
/// PostgreSQL turns those into multixacts, which cost more than the insert.
/// Sales are never deleted, so the store checks each sale id once per
/// connection and refuses a message naming an unknown sale, as the foreign
/// key did.
pub struct LogApplier {
    client: tokio_postgres::Client,
    upsert: tokio_postgres::Statement,
    copy: tokio_postgres::Statement,
    known_sales: std::collections::HashMap<uuid::Uuid, (i64, String)>,
}

/// The columns of `orders` an order-log entry writes, in the order the
/// upsert and the `COPY` take them (a macro, so that both statements can
/// be constant text).
macro_rules! order_log_columns {
    () => {
        "id, sale_id, user_id, quantity, status, idempotency_key, created_at, expires_at, paid_at, closed_at, price_cents, currency"
    };
}

/// The `COPY` of new reservations.
const COPY_ORDERS: &str = concat!(
    "COPY orders (",
    order_log_columns!(),
    ") FROM STDIN (FORMAT binary)"
);

/// The types of `order_log_columns!`, in order, for the binary `COPY`.
const ORDER_LOG_TYPES: [tokio_postgres::types::Type; 12] = {
    use tokio_postgres::types::Type;
    [
        Type::UUID,
        Type::UUID,
        Type::UUID,
        Type::INT4,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::TEXT,
    ]
};

/// The statement every order-log entry can be applied with (transitions,
/// replays, and sets the `COPY` could not take).
const UPSERT_ORDERS: &str = concat!(
    "INSERT INTO orders (",
    order_log_columns!(),
    ") SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[], \
                          $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::int8[], $12::text[]) \
     ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, paid_at = EXCLUDED.paid_at, closed_at = EXCLUDED.closed_at \
     WHERE orders.status = 'reserved' AND EXCLUDED.status <> 'reserved'"
);

impl LogApplier {
    /// Prepares the upsert and the `COPY` on `client`.
    pub async fn new(client: tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let upsert = client.prepare(UPSERT_ORDERS).await?;
        let copy = client.prepare(COPY_ORDERS).await?;
        Ok(LogApplier {
            client,
            upsert,
            copy,
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
        let orders = latest_states(msgs.iter().flat_map(|m| &m.entries).map(LogEntry::order));
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
        let only_new = msgs
            .iter()
            .flat_map(|m| &m.entries)
            .all(|e| !e.is_transition());
        if only_new {
            match copy_new(&self.client, &self.copy, &orders).await {
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                copied => return copied.map_err(classify_apply),
            }
        }
        upsert(&self.client, &self.upsert, &orders)
            .await
            .map_err(classify_apply)
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
            .map_err(classify_apply)?;
        for row in rows {
            let id = row.try_get(0).map_err(classify_apply)?;
            let price = (
                row.try_get(1).map_err(classify_apply)?,
                row.try_get(2).map_err(classify_apply)?,
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
async fn upsert<S>(
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

/// Writes `orders`, none of which may be in the table yet, with the binary
/// `COPY` prepared as `statement`: all of them or, on any error (a unique
/// violation among them), none.
async fn copy_new(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    orders: &[&Order],
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in(statement).await?;
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &ORDER_LOG_TYPES);
    futures_util::pin_mut!(writer);
    for o in orders {
        let quantity = i32::try_from(o.quantity).unwrap_or(i32::MAX);
        writer
            .as_mut()
            .write(&[
                &o.id,
                &o.sale_id,
                &o.user_id,
                &quantity,
                &o.status.as_str(),
                &o.idempotency_key.as_deref(),
                &o.created_at,
                &o.expires_at,
                &o.paid_at,
                &o.closed_at,
                &o.price_cents,
                &o.currency.as_str(),
            ])
            .await?;
    }
    writer.finish().await
}

const ORDER_COLUMNS: &str =
    "SELECT id, sale_id, user_id, quantity, status, created_at, expires_at, \
     paid_at, idempotency_key, closed_at, price_cents, currency FROM orders";

fn order_from_row(row: &Row) -> Option<Order> {
    Some(Order {
        id: row.get(0),
        sale_id: row.get(1),
        user_id: row.get(2),
        quantity: u32::try_from(row.get::<_, i32>(3)).ok()?,
        status: OrderStatus::parse(row.get(4))?,
        created_at: row.get(5),
        expires_at: row.get(6),
        paid_at: row.get(7),
        idempotency_key: row.get(8),
        closed_at: row.get(9),
        price_cents: row.get::<_, Option<i64>>(10).unwrap_or(0),
        currency: row.get::<_, Option<String>>(11).unwrap_or_default(),
    })
}

const SALE_COLUMNS: &str = "SELECT id, name, description, price_cents, currency, stock_total, \
     per_user_limit, starts_at, ends_at, reservation_ttl_secs, paused, created_at, updated_at FROM sales";

fn sale_from_row(row: &Row) -> Sale {
    Sale {
        id: row.get(0),
        spec: SaleSpec {
            name: row.get(1),
            description: row.get(2),
            price_cents: row.get(3),
            currency: row.get(4),
            stock_total: i64::from(row.get::<_, i32>(5)),
            per_user_limit: i64::from(row.get::<_, i32>(6)),
            starts_at: row.get::<_, DateTime<Utc>>(7),
            ends_at: row.get::<_, DateTime<Utc>>(8),
            reservation_ttl_secs: i64::from(row.get::<_, i32>(9)),
        },
        paused: row.get(10),
        created_at: row.get(11),
        updated_at: row.get(12),
    }
}

/// Validated domain values always fit: stock, limits and TTLs are bounded far
/// below `i32::MAX` by `SaleSpec::validate`.
fn to_i32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// `host:port/dbname` of a connection config, without credentials.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

async fn connect_once(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres maintenance connection closed");
        }
    });
    Ok(client)
}

async fn create_database_if_missing(
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<(), anyhow::Error> {
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        anyhow::bail!("database name {name:?} must be ASCII letters, digits, '_' or '-'");
    }
    let mut admin = config.clone();
    admin.dbname("postgres").connect_timeout(timeout);
    let client = connect_once(&admin).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        match client
            .simple_query(&format!("CREATE DATABASE \"{name}\""))
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Applies the versioned migrations in `migrations/` (embedded at build time).
pub async fn run_migrations(config: &tokio_postgres::Config) -> Result<(), anyhow::Error> {
    let mut client = connect_once(config).await?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(())
}
