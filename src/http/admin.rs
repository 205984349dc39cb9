//! Operator endpoints: `/metrics` (Prometheus text) and
//! `GET /admin/v1/actors`, the live state of every stock actor and of the
//! order pipeline. Both read what the actors and the pipeline publish in
//! atomics, so polling them every second during a sale costs the sale nothing
//! it would notice (no mailbox message, no database or broker round trip).

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::AppState;
use crate::breaker::BreakerSnapshot;
use crate::domain::sale::SaleStatus;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StockActorStatus {
    pub sale_id: Uuid,
    pub name: String,
    pub status: SaleStatus,
    pub stock_total: i64,
    pub stock_left: u32,
    pub reserved: u64,
    pub paid: u64,
    pub expired: u64,
    pub cancelled: u64,
    pub mailbox_depth: usize,
    pub messages_handled: u64,
    /// False once the actor stopped because its sale ended
    /// (`stock.idle_stop_after_secs`); it starts again when needed.
    pub running: bool,
    /// Orders its book keeps whole: reserved, or with a change not yet
    /// durable. Settled orders leave it.
    pub orders_in_play: usize,
    /// Bumped on every change of the sale's state.
    pub version: u64,
    /// The version last written to Redis, and when.
    pub snapshot_version: u64,
    pub last_snapshot_at: Option<DateTime<Utc>>,
    pub snapshot_failures: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublisherStatus {
    pub connected: bool,
    pub queued: usize,
    pub unconfirmed_batches: usize,
    pub batches_confirmed: u64,
    pub entries_confirmed: u64,
    pub batches_failed: u64,
    pub in_doubt: usize,
    pub released: u64,
    pub last_confirm_ms: f64,
    pub connects: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WriterPoolStatus {
    pub pool_size: usize,
    pub connected: usize,
    pub in_flight: usize,
    pub messages_written: u64,
    pub rows_written: u64,
    /// Statements the writers committed; each holds the messages gathered
    /// for it (`orders.writer_gather_ms`).
    pub writes: u64,
    pub dead_letters: u64,
    pub retries: u64,
    pub last_batch_ms: f64,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineStatus {
    /// `embedded` (SQLite is the order log and the store) or `services`
    /// (RabbitMQ, the writers, PostgreSQL).
    pub storage: &'static str,
    /// The group commit into the order log (RabbitMQ or SQLite).
    pub publisher: PublisherStatus,
    /// Circuit breakers of the mode's dependencies (RabbitMQ, PostgreSQL
    /// and Redis; or SQLite).
    pub breakers: std::collections::BTreeMap<&'static str, BreakerSnapshot>,
    /// Messages ready in the order queue (sampled about once a second;
    /// always 0 in embedded mode, where a confirmed batch is in the store).
    pub queue_depth: u32,
    /// The writers from RabbitMQ into PostgreSQL (none in embedded mode).
    pub writers: WriterPoolStatus,
    /// Confirmed orders kept in memory for reads until PostgreSQL holds them.
    pub directory_orders: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActorsStatus {
    pub server_time: DateTime<Utc>,
    pub stock_actors: Vec<StockActorStatus>,
    pub pipeline: PipelineStatus,
}

#[utoipa::path(get, path = "/admin/v1/actors", tag = "admins", security(("admin_token" = [])),
    responses((status = 200, body = ActorsStatus),
        (status = 401, description = "unauthenticated", body = Problem)))]
pub async fn actors(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(actors_status(&state)))
}

/// Every stock actor and the order pipeline, read from their atomics (also
/// pushed by `GET /admin/v1/events`).
pub fn actors_status(state: &AppState) -> ActorsStatus {
    let now = Utc::now();
    let mut stock_actors: Vec<StockActorStatus> = state
        .registry
        .all()
        .iter()
        .map(|h| {
            let s = &h.shared;
            let sale = s.sale();
            let c = s.counters();
            let at = s.snapshot_at_ms.load(Ordering::Relaxed);
            StockActorStatus {
                sale_id: sale.id,
                name: sale.spec.name.clone(),
                status: sale.status(now, i64::from(s.stock_left())),
                stock_total: sale.spec.stock_total,
                stock_left: s.stock_left(),
                reserved: c.reserved,
                paid: c.paid,
                expired: c.expired,
                cancelled: c.cancelled,
                mailbox_depth: s.mailbox_depth(),
                messages_handled: s.messages_handled.load(Ordering::Relaxed),
                running: h.is_running(),
                orders_in_play: s.orders_in_play.load(Ordering::Relaxed),
                version: s.version.load(Ordering::Relaxed),
                snapshot_version: s.snapshot_version.load(Ordering::Relaxed),
                last_snapshot_at: (at > 0)
                    .then(|| Utc.timestamp_millis_opt(at).single())
                    .flatten(),
                snapshot_failures: s.snapshot_failures.load(Ordering::Relaxed),
            }
        })
        .collect();
    stock_actors.sort_by_key(|a| a.sale_id);
    let p = state.publisher.stats();
    let w = &state.writers;
    ActorsStatus {
        server_time: now,
        stock_actors,
        pipeline: PipelineStatus {
            breakers: state
                .breakers
                .all()
                .into_iter()
                .map(|(name, b)| (name, b.snapshot()))
                .collect(),
            storage: state.mode.as_str(),
            publisher: PublisherStatus {
                connected: state.publisher.is_up(),
                queued: state.publisher.queued(),
                unconfirmed_batches: p.unconfirmed_batches.load(Ordering::Relaxed),
                batches_confirmed: p.batches_confirmed.load(Ordering::Relaxed),
                entries_confirmed: p.entries_confirmed.load(Ordering::Relaxed),
                batches_failed: p.batches_failed.load(Ordering::Relaxed),
                in_doubt: p.in_doubt.load(Ordering::Relaxed),
                released: p.released.load(Ordering::Relaxed),
                last_confirm_ms: p.last_confirm_us.load(Ordering::Relaxed) as f64 / 1000.0,
                connects: p.reconnects.load(Ordering::Relaxed),
                last_error: p.last_error(),
            },
            queue_depth: p.queue_depth.load(Ordering::Relaxed),
            directory_orders: state.registry.orders.len(),
            writers: WriterPoolStatus {
                pool_size: state.writer_pool_size,
                connected: w.connected.load(Ordering::Relaxed),
                in_flight: w.in_flight.load(Ordering::Relaxed),
                messages_written: w.messages_written.load(Ordering::Relaxed),
                rows_written: w.rows_written.load(Ordering::Relaxed),
                writes: w.writes.load(Ordering::Relaxed),
                dead_letters: w.dead_letters.load(Ordering::Relaxed),
                retries: w.retries.load(Ordering::Relaxed),
                last_batch_ms: w.last_batch_us.load(Ordering::Relaxed) as f64 / 1000.0,
                last_error: w.last_error(),
            },
        },
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus/OpenMetrics text")))]
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut body = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut body, &state.metrics_registry)
        .map_err(|e| ApiError::internal(anyhow::anyhow!("encoding metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(body))
}
