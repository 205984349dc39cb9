//! SQLite, the store and the order log of embedded mode, in one file.
//!
//! - [`SqliteStore`] serves [`Store`] from a small pool of connections
//!   (`storage.read_connections`), each call on a blocking thread. The pool
//!   is a few lines of its own: a pooled connection may be dropped on any
//!   thread (an actix worker that is stopping has no runtime any more), and
//!   a rusqlite connection can be.
//! - [`SqliteLog`] is the order log's writer: one connection on a thread of
//!   its own, which commits each batch (and any batches queued behind it)
//!   in one transaction. The file is in WAL mode with `synchronous = FULL`,
//!   so a commit has reached the disk when it returns: that is the confirm
//!   that releases the 201s. Readers never wait for it.
//!
//! Every statement SQLite runs is in this file. Entries are applied with the
//! same rule as in PostgreSQL: an upsert keyed on the order id that only
//! ever moves a row out of `reserved`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::store::{EventClaim, Store, StoreError};
use super::Unreachable;
use crate::config::StorageSettings;
use crate::domain::order::{Order, OrderStatus};
use crate::domain::sale::{Sale, SaleSpec};
use crate::domain::sale_book::{BookRestore, SaleBook};

/// The schema, by version (`PRAGMA user_version` says which are applied).
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/V1__initial.sql")];

/// The pooled SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    pool: Arc<Pool>,
    path: PathBuf,
    tuning: Tuning,
    /// How long a caller waits for a call: the busy time-out plus a margin.
    deadline: Duration,
    checkpoint_pages: u32,
}

/// At most `permits` connections in use; idle ones are kept for the next
/// call, and opened on demand.
struct Pool {
    idle: std::sync::Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl SqliteStore {
    /// Opens (creating the file and its directory) and migrates the store.
    pub async fn open(settings: &StorageSettings) -> Result<Self, Unreachable> {
        let path = settings.path.clone();
        let shown = path.display().to_string();
        let unreachable = |e: &dyn std::fmt::Display| {
            Unreachable::new("SQLite", shown.clone(), "storage.path", e)
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| unreachable(&e))?;
        }
        let busy_timeout = Duration::from_millis(settings.busy_timeout_ms);
        let tuning = Tuning {
            busy_timeout,
            cache_kib: settings.cache_mib.saturating_mul(1024),
        };
        let migrate_path = path.clone();
        tokio::task::spawn_blocking(move || migrate(&migrate_path, tuning))
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?;
        let pool = Arc::new(Pool {
            idle: Default::default(),
            permits: Arc::new(Semaphore::new(settings.read_connections)),
        });
        let store = SqliteStore {
            pool,
            path,
            tuning,
            deadline: busy_timeout + Duration::from_secs(1),
            checkpoint_pages: settings.checkpoint_pages.max(1),
        };
        store.ping().await.map_err(|e| unreachable(&e))?;
        Ok(store)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a pooled connection on a blocking thread, within the
    /// deadline.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        tokio::time::timeout(self.deadline, self.run(f))
            .await
            .unwrap_or(Err(StoreError::Unavailable))
    }

    /// Runs `f` on a pooled connection on a blocking thread, however long
    /// it takes (recovery reads).
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable)?;
        let (pool, path, tuning) = (self.pool.clone(), self.path.clone(), self.tuning);
        tokio::task::spawn_blocking(move || {
            let idle = pool.idle.lock().ok().and_then(|mut i| i.pop());
            let mut conn = match idle {
                Some(c) => c,
                None => {
                    let c = Connection::open(&path)?;
                    configure(&c, tuning)?;
                    c
                }
            };
            let result = f(&mut conn);
            if let Ok(mut i) = pool.idle.lock() {
                i.push(conn);
            }
            drop(permit);
            result
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
        .map_err(classify)
    }

    /// Opens the order log's writer: a connection of its own on a thread of
    /// its own.
    pub async fn open_log(&self) -> Result<SqliteLog, StoreError> {
        let (path, tuning) = (self.path.clone(), self.tuning);
        let conn = tokio::task::spawn_blocking(move || {
            let conn = Connection::open(&path)?;
            configure(&conn, tuning)?;
            Ok::<_, rusqlite::Error>(conn)
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
        .map_err(classify)?;
        SqliteLog::start(conn, self.checkpoint_pages)
    }
}

/// Every connection: wait for the write lock up to the busy time-out, commit
/// with a full sync (WAL mode is a property of the file, set once), and keep
/// its page cache.
fn configure(conn: &Connection, tuning: Tuning) -> rusqlite::Result<()> {
    conn.busy_timeout(tuning.busy_timeout)?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF; PRAGMA cache_size = -{};",
        tuning.cache_kib
    ))
}

/// What every connection is opened with.
#[derive(Clone, Copy)]
struct Tuning {
    busy_timeout: Duration,
    /// Page cache per connection (`storage.cache_mib`).
    cache_kib: u32,
}

/// WAL journal, then the migrations not yet applied, each in a transaction.
fn migrate(path: &Path, tuning: Tuning) -> rusqlite::Result<()> {
    let mut conn = Connection::open(path)?;
    configure(&conn, tuning)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "SQLite refused the WAL journal");
    }
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied SQLite migration");
    }
    Ok(())
}

/// Busy (another writer holds the lock past the time-out), a full disk or
/// an I/O error is the store being away for now; a unique constraint names
/// what it guards; the rest is a fault of the statement.
fn classify(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => {
            let text = e.to_string();
            if text.contains("UNIQUE") {
                StoreError::Duplicate(text)
            } else {
                StoreError::Engine(text)
            }
        }
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory,
        ) => {
            tracing::warn!(error = %e, "SQLite unavailable");
            StoreError::Unavailable
        }
        _ => StoreError::Engine(e.to_string()),
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).ok_or(rusqlite::Error::IntegralValueOutOfRange(0, us))
}

fn uuid_at(row: &Row<'_>, i: usize) -> rusqlite::Result<Uuid> {
    let bytes: [u8; 16] = row.get(i)?;
    Ok(Uuid::from_bytes(bytes))
}

/// The one statement every order-log entry is applied with (see the module
/// docs): a replay changes nothing, a later state wins over `reserved`.
const UPSERT_ORDER: &str =
    "INSERT INTO orders (id, sale_id, user_id, quantity, status, idempotency_key, \
     created_us, expires_us, paid_us, closed_us, price_cents, currency) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
     ON CONFLICT (id) DO UPDATE SET status = excluded.status, paid_us = excluded.paid_us, \
     closed_us = excluded.closed_us \
     WHERE orders.status = 'reserved' AND excluded.status <> 'reserved'";

/// Applies `orders` in their order inside `tx`.
fn upsert<'a>(
    tx: &rusqlite::Transaction<'_>,
    orders: impl IntoIterator<Item = &'a Order>,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(UPSERT_ORDER)?;
    for o in orders {
        stmt.execute(params![
            o.id.as_bytes(),
            o.sale_id.as_bytes(),
            o.user_id.as_bytes(),
            o.quantity,
            o.status.as_str(),
            o.idempotency_key,
            micros(o.created_at),
            micros(o.expires_at),
            o.paid_at.map(micros),
            o.closed_at.map(micros),
            o.price_cents,
            o.currency,
        ])?;
    }
    Ok(())
}

const ORDER_COLUMNS: &str =
    "SELECT id, sale_id, user_id, quantity, status, created_us, expires_us, \
     paid_us, idempotency_key, closed_us, price_cents, currency FROM orders";

/// An order row; `None` for a void one.
fn order_from_row(row: &Row<'_>) -> rusqlite::Result<Option<Order>> {
    let status: String = row.get(4)?;
    let Some(status) = OrderStatus::parse(&status) else {
        return Ok(None);
    };
    Ok(Some(Order {
        id: uuid_at(row, 0)?,
        sale_id: uuid_at(row, 1)?,
        user_id: uuid_at(row, 2)?,
        quantity: row.get(3)?,
        status,
        created_at: time(row.get(5)?)?,
        expires_at: time(row.get(6)?)?,
        paid_at: row.get::<_, Option<i64>>(7)?.map(time).transpose()?,
        idempotency_key: row.get(8)?,
        closed_at: row.get::<_, Option<i64>>(9)?.map(time).transpose()?,
        price_cents: row.get::<_, Option<i64>>(10)?.unwrap_or(0),
        currency: row.get::<_, Option<String>>(11)?.unwrap_or_default(),
    }))
}

const SALE_COLUMNS: &str = "SELECT id, name, description, price_cents, currency, stock_total, \
     per_user_limit, starts_us, ends_us, reservation_ttl_secs, paused, created_us, updated_us FROM sales";

fn sale_from_row(row: &Row<'_>) -> rusqlite::Result<Sale> {
    Ok(Sale {
        id: uuid_at(row, 0)?,
        spec: SaleSpec {
            name: row.get(1)?,
            description: row.get(2)?,
            price_cents: row.get(3)?,
            currency: row.get(4)?,
            stock_total: row.get(5)?,
            per_user_limit: row.get(6)?,
            starts_at: time(row.get(7)?)?,
            ends_at: time(row.get(8)?)?,
            reservation_ttl_secs: row.get(9)?,
        },
        paused: row.get(10)?,
        created_at: time(row.get(11)?)?,
        updated_at: time(row.get(12)?)?,
    })
}

/// Runs `sql` with a sale's columns as ?1..?13, in the table's order (an
/// update leaves `created_us`, ?12, unused).
fn write_sale(c: &Connection, sql: &str, sale: &Sale) -> rusqlite::Result<()> {
    let s = &sale.spec;
    c.execute(
        sql,
        params![
            sale.id.as_bytes(),
            s.name,
            s.description,
            s.price_cents,
            s.currency,
            s.stock_total,
            s.per_user_limit,
            micros(s.starts_at),
            micros(s.ends_at),
            s.reservation_ttl_secs,
            sale.paused,
            micros(sale.created_at),
            micros(sale.updated_at),
        ],
    )
    .map(drop)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn insert_user(
        &self,
        id: Uuid,
        username: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        let (username, hash) = (username.to_owned(), password_hash.to_owned());
        self.call(move |c| {
            c.execute(
                "INSERT INTO users (id, username, password_hash, created_us) VALUES (?1, ?2, ?3, ?4)",
                params![id.as_bytes(), username, hash, micros(Utc::now())],
            )
            .map(drop)
        })
        .await
    }

    async fn user_credentials(&self, username: &str) -> Result<Option<(Uuid, String)>, StoreError> {
        let username = username.to_owned();
        self.call(move |c| {
            c.prepare_cached("SELECT id, password_hash FROM users WHERE username = ?1")?
                .query_row([username], |r| Ok((uuid_at(r, 0)?, r.get(1)?)))
                .optional()
        })
        .await
    }

    async fn insert_sale(&self, sale: &Sale) -> Result<(), StoreError> {
        let sale = sale.clone();
        self.call(move |c| {
            write_sale(
                c,
                "INSERT INTO sales (id, name, description, price_cents, currency, stock_total, \
                 per_user_limit, starts_us, ends_us, reservation_ttl_secs, paused, created_us, updated_us) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                &sale,
            )
        })
        .await
    }

    async fn update_sale(&self, sale: &Sale) -> Result<(), StoreError> {
        let sale = sale.clone();
        self.call(move |c| {
            write_sale(
                c,
                "UPDATE sales SET name = ?2, description = ?3, price_cents = ?4, currency = ?5, \
                 stock_total = ?6, per_user_limit = ?7, starts_us = ?8, ends_us = ?9, \
                 reservation_ttl_secs = ?10, paused = ?11, updated_us = ?13 WHERE id = ?1",
                &sale,
            )
        })
        .await
    }

    async fn list_sales(&self) -> Result<Vec<Sale>, StoreError> {
        self.call(|c| {
            c.prepare(&format!("{SALE_COLUMNS} ORDER BY starts_us DESC, id"))?
                .query_map([], sale_from_row)?
                .collect()
        })
        .await
    }

    /// Steps through the rows on a blocking thread, without the deadline:
    /// a large store takes as long as it takes to read.
    async fn restore_books(&self, sales: Vec<Sale>) -> Result<HashMap<Uuid, SaleBook>, StoreError> {
        let only = match sales.as_slice() {
            [one] => Some(*one.id.as_bytes()),
            _ => None,
        };
        let mut books: HashMap<Uuid, BookRestore> = sales
            .into_iter()
            .map(|s| (s.id, BookRestore::new(s)))
            .collect();
        self.run(move |c| {
            let mut stmt = c.prepare(&format!(
                "{ORDER_COLUMNS} WHERE (?1 IS NULL OR sale_id = ?1) AND status <> 'void'"
            ))?;
            let mut rows = stmt.query([only.as_ref().map(|b| &b[..])])?;
            while let Some(row) = rows.next()? {
                if let Some(order) = order_from_row(row)? {
                    if let Some(book) = books.get_mut(&order.sale_id) {
                        book.add(&order);
                    }
                }
            }
            Ok(books.into_iter().map(|(id, b)| (id, b.finish())).collect())
        })
        .await
    }

    async fn order(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        self.call(move |c| {
            Ok(c.prepare_cached(&format!("{ORDER_COLUMNS} WHERE id = ?1"))?
                .query_row([id.as_bytes()], order_from_row)
                .optional()?
                .flatten())
        })
        .await
    }

    async fn user_orders(&self, user_id: Uuid, limit: i64) -> Result<Vec<Order>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{ORDER_COLUMNS} WHERE user_id = ?1 AND status <> 'void' \
                 ORDER BY created_us DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![user_id.as_bytes(), limit], order_from_row)?;
            rows.filter_map(Result::transpose).collect()
        })
        .await
    }

    async fn write_orders(&self, orders: &[&Order]) -> Result<(), StoreError> {
        let orders: Vec<Order> = orders.iter().map(|o| (*o).clone()).collect();
        self.call(move |c| {
            let tx = c.transaction()?;
            upsert(&tx, &orders)?;
            tx.commit()
        })
        .await
    }

    async fn order_statuses(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, String>, StoreError> {
        let ids = ids.to_vec();
        self.call(move |c| {
            let mut stmt = c.prepare_cached("SELECT status FROM orders WHERE id = ?1")?;
            let mut found = HashMap::new();
            for id in ids {
                if let Some(status) = stmt
                    .query_row([id.as_bytes()], |r| r.get::<_, String>(0))
                    .optional()?
                {
                    found.insert(id, status);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn void_absent(&self, orders: &[&Order]) -> Result<Vec<Uuid>, StoreError> {
        let orders: Vec<Order> = orders.iter().map(|o| (*o).clone()).collect();
        self.call(move |c| {
            let tx = c.transaction()?;
            let mut voided = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO orders (id, sale_id, user_id, quantity, status, created_us, expires_us, closed_us) \
                     VALUES (?1, ?2, ?3, ?4, 'void', ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                )?;
                let now = micros(Utc::now());
                for o in &orders {
                    let inserted = stmt.execute(params![
                        o.id.as_bytes(),
                        o.sale_id.as_bytes(),
                        o.user_id.as_bytes(),
                        o.quantity,
                        micros(o.created_at),
                        micros(o.expires_at),
                        now,
                    ])?;
                    if inserted == 1 {
                        voided.push(o.id);
                    }
                }
            }
            tx.commit()?;
            Ok(voided)
        })
        .await
    }

    async fn claim_payment_event(
        &self,
        event_id: &str,
        order_id: Uuid,
    ) -> Result<EventClaim, StoreError> {
        let event_id = event_id.to_owned();
        self.call(move |c| {
            let inserted = c.execute(
                "INSERT INTO payment_events (event_id, order_id, received_us) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (event_id) DO NOTHING",
                params![event_id, order_id.as_bytes(), micros(Utc::now())],
            )?;
            if inserted == 1 {
                return Ok(EventClaim::New);
            }
            let result: Option<String> = c
                .query_row(
                    "SELECT result FROM payment_events WHERE event_id = ?1",
                    [&event_id],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            Ok(match result {
                Some(result) => EventClaim::Done(result),
                None => EventClaim::InProgress,
            })
        })
        .await
    }

    async fn finish_payment_event(&self, event_id: &str, result: &str) -> Result<(), StoreError> {
        let (event_id, result) = (event_id.to_owned(), result.to_owned());
        self.call(move |c| {
            c.execute(
                "UPDATE payment_events SET result = ?2 WHERE event_id = ?1",
                params![event_id, result],
            )
            .map(drop)
        })
        .await
    }

    async fn forget_payment_event(&self, event_id: &str) -> Result<(), StoreError> {
        let event_id = event_id.to_owned();
        self.call(move |c| {
            c.execute(
                "DELETE FROM payment_events WHERE event_id = ?1 AND result IS NULL",
                [event_id],
            )
            .map(drop)
        })
        .await
    }
}

/// A batch for the log writer and where its commit is reported.
struct Job {
    orders: Vec<Order>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Batches queued for the log writer, at most (the publisher's permits
/// bound them far below this).
const LOG_QUEUE: usize = 1024;

/// The order log's writer in embedded mode: its own connection on its own
/// thread. Batches queued while a commit runs are committed together, in
/// one transaction and one sync. Dropping the last handle ends the thread
/// once it has committed what it was given.
pub struct SqliteLog {
    jobs: std::sync::mpsc::SyncSender<Job>,
    alive: Arc<AtomicBool>,
}

impl SqliteLog {
    fn start(conn: Connection, checkpoint_pages: u32) -> Result<Self, StoreError> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(LOG_QUEUE);
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        // The committing connection copies the write-ahead log into the
        // file once it holds `checkpoint_pages` pages: the log stays
        // bounded, and a page written by many commits is copied once.
        conn.pragma_update(None, "wal_autocheckpoint", checkpoint_pages)
            .map_err(classify)?;
        std::thread::Builder::new()
            .name("fs-sqlite-log".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = queue.try_recv() {
                        batch.push(more);
                    }
                    let result = commit(&mut conn, &batch).map_err(|e| e.to_string());
                    for job in batch {
                        let _ = job.done.send(result.clone());
                    }
                }
                flag.store(false, Ordering::Release);
            })
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        Ok(SqliteLog { jobs, alive })
    }

    pub fn is_open(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Queues a batch; the receiver tells when its transaction committed.
    pub fn append(
        &self,
        orders: Vec<Order>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Job { orders, done })
            .map_err(|e| format!("the SQLite log writer cannot take a batch: {e}"))?;
        Ok(committed)
    }
}

/// One transaction for every batch taken together.
fn commit(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    upsert(&tx, batch.iter().flat_map(|j| &j.orders))?;
    tx.commit()
}
