//! PostgreSQL: the source of truth for users, sales and orders.
//!
//! One pooled [`Database`] serves request handlers and recovery. Queries live
//! here as methods so that handlers deal in domain types and one error type.

use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use tokio_postgres::{error::SqlState, NoTls, Row};
use uuid::Uuid;

use super::Unreachable;
use crate::config::DatabaseSettings;
use crate::domain::order::{Order, OrderStatus};
use crate::domain::sale::{Sale, SaleSpec};

mod embedded {
    refinery::embed_migrations!("migrations");
}

type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

/// Failures of the store, as the callers need to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the row (the name of the constraint is kept).
    #[error("unique constraint {0} violated")]
    Duplicate(String),
    /// No connection could be had in time: the database is down or saturated.
    #[error("no database connection available in time")]
    Unavailable,
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl From<bb8::RunError<tokio_postgres::Error>> for StoreError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::User(e) => e.into(),
            bb8::RunError::TimedOut => StoreError::Unavailable,
        }
    }
}

fn classify(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let constraint = e
            .as_db_error()
            .and_then(|d| d.constraint())
            .unwrap_or("unknown")
            .to_owned();
        return StoreError::Duplicate(constraint);
    }
    StoreError::Postgres(e)
}

/// The pooled PostgreSQL store.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
}

impl Database {
    /// Connects (creating the database first when configured to), applies the
    /// migrations and builds the pool.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, Unreachable> {
        let url = settings.url.expose_secret();
        let config = tokio_postgres::Config::from_str(url).map_err(|e| {
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
        let mut config = config;
        config.connect_timeout(timeout);
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
        let db = Database { pool };
        db.ping().await.map_err(|e| unreachable(&e))?;
        Ok(db)
    }

    /// Round trip to the database, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        conn.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn insert_user(
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
    pub async fn user_credentials(
        &self,
        username: &str,
    ) -> Result<Option<(Uuid, String)>, StoreError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                "SELECT id, password_hash FROM users WHERE username = $1",
                &[&username],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn insert_sale(&self, sale: &Sale) -> Result<(), StoreError> {
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

    /// Writes a sale's editable fields and pause flag.
    pub async fn update_sale(&self, sale: &Sale) -> Result<(), StoreError> {
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

    pub async fn get_sale(&self, id: Uuid) -> Result<Option<Sale>, StoreError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(&format!("{SALE_COLUMNS} WHERE id = $1"), &[&id])
            .await?;
        Ok(row.as_ref().map(sale_from_row))
    }

    /// Every sale, newest start first.
    pub async fn list_sales(&self) -> Result<Vec<Sale>, StoreError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(&format!("{SALE_COLUMNS} ORDER BY starts_at DESC, id"), &[])
            .await?;
        Ok(rows.iter().map(sale_from_row).collect())
    }
}

impl Database {
    /// Every order of every sale, except void ones, for rebuilding the stock
    /// actors' books at start-up.
    pub async fn orders_for_recovery(&self) -> Result<Vec<Order>, StoreError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(&format!("{ORDER_COLUMNS} WHERE status <> 'void'"), &[])
            .await?;
        Ok(rows.iter().filter_map(order_from_row).collect())
    }

    /// One order, whoever owns it (callers check ownership).
    pub async fn order(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
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
    pub async fn user_orders(&self, user_id: Uuid, limit: i64) -> Result<Vec<Order>, StoreError> {
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

    /// Decides an order whose publish was never confirmed: if PostgreSQL has
    /// it, it stands (returns false); otherwise a `void` row takes its id,
    /// so that a late copy of the reservation can never be inserted
    /// (returns true: release its units).
    pub async fn void_if_absent(&self, order: &Order) -> Result<bool, StoreError> {
        let conn = self.pool.get().await?;
        let qty = i32::try_from(order.quantity).unwrap_or(i32::MAX);
        let inserted = conn
            .execute(
                "INSERT INTO orders (id, sale_id, user_id, quantity, status, created_at, expires_at, closed_at) \
                 VALUES ($1, $2, $3, $4, 'void', $5, $6, now()) ON CONFLICT (id) DO NOTHING",
                &[
                    &order.id,
                    &order.sale_id,
                    &order.user_id,
                    &qty,
                    &order.created_at,
                    &order.expires_at,
                ],
            )
            .await?;
        Ok(inserted == 1)
    }
}

const ORDER_COLUMNS: &str =
    "SELECT id, sale_id, user_id, quantity, status, created_at, expires_at, \
     paid_at, idempotency_key, closed_at FROM orders";

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
