//! Liveness, readiness and the OpenAPI document.
//!
//! `/healthz` answers while the process lives (it touches nothing, so it is
//! also the ceiling that benchmarks compare against). `/readyz` is ready only
//! once recovery is done and PostgreSQL, Redis and RabbitMQ all answer.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::error::PROBLEM_JSON;
use super::AppState;
use crate::breaker::BreakerSnapshot;
use crate::config::StorageMode;

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`; `degraded` (purchases work, but PostgreSQL or Redis does not
    /// answer: orders wait in RabbitMQ, snapshots pause); or `not_ready`.
    pub status: &'static str,
    /// Each dependency and recovery: `ok`, or what is wrong.
    pub checks: std::collections::BTreeMap<&'static str, String>,
    /// Each dependency's circuit breaker.
    pub breakers: std::collections::BTreeMap<&'static str, BreakerSnapshot>,
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "the process is alive")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body("ok")
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn check<F, E>(fut: F) -> String
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => format!("error: no answer within {} ms", CHECK_TIMEOUT.as_millis()),
    }
}

/// The checks of the store and the services, as last looked at: `postgres`,
/// `redis` and `rabbitmq` (the order log) in services mode; `sqlite` and
/// `order_log` in embedded mode.
#[derive(Debug, Clone)]
pub struct ServiceChecks {
    at: std::time::Instant,
    checks: Vec<(&'static str, String)>,
}

/// The check whose failure stops purchases: the order log's.
fn order_log_check(mode: StorageMode) -> &'static str {
    match mode {
        StorageMode::Services => "rabbitmq",
        StorageMode::Embedded => "order_log",
    }
}

/// The last round trip to every service, reused for
/// `server.readiness_cache_ms`: a prober (or a flood) polling `/readyz`
/// costs the services one round trip per period, not one per call.
#[derive(Default)]
pub struct ReadinessCache(std::sync::Mutex<Option<ServiceChecks>>);

impl ReadinessCache {
    async fn checks(&self, state: &AppState) -> ServiceChecks {
        let fresh = self
            .0
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .filter(|c| c.at.elapsed() < state.readiness_cache);
        if let Some(c) = fresh {
            return c;
        }
        let redis = async {
            match &state.stock.snapshots {
                Some(r) => Some(check(r.ping()).await),
                None => None,
            }
        };
        let (store, redis, log) = tokio::join!(
            check(state.store.ping()),
            redis,
            check(async { state.pipeline_health() }),
        );
        let mut checks = vec![
            (state.store.engine(), store),
            (order_log_check(state.mode), log),
        ];
        checks.extend(redis.map(|r| ("redis", r)));
        let checks = ServiceChecks {
            at: std::time::Instant::now(),
            checks,
        };
        if let Ok(mut g) = self.0.lock() {
            *g = Some(checks.clone());
        }
        checks
    }
}

/// What an anonymous caller may see of a check: whether it is fine, and
/// recovery's progress; never an internal error text.
fn public(check: String) -> String {
    if check == "ok" || check.starts_with("recovering") || check == "shutting down" {
        check
    } else {
        "error".to_owned()
    }
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready or degraded; error texts only with the admin token", body = Readiness),
        (status = 503, description = "not ready: recovering (with the messages left), shutting down, or no order log", body = Readiness)))]
pub async fn readyz(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let admin = super::auth::bearer(&req).is_some_and(|t| state.admin_token.matches(t));
    let services = state.readiness.checks(&state).await;
    let shown = |c: String| if admin { c } else { public(c) };
    let mut checks = std::collections::BTreeMap::new();
    for (name, check) in services.checks {
        checks.insert(name, shown(check));
    }
    checks.insert("recovery", state.recovery_status());
    let breakers = state
        .breakers
        .all()
        .into_iter()
        .map(|(name, b)| {
            let mut snapshot = b.snapshot();
            if !admin {
                snapshot.last_error = None;
            }
            (name, snapshot)
        })
        .collect();
    // Purchases need recovery and the order log; the store (in services
    // mode) and Redis may be away for a while without refusing a purchase.
    let serving = checks["recovery"] == "ok" && checks[order_log_check(state.mode)] == "ok";
    let all_ok = checks.values().all(|v| v == "ok");
    let body = Readiness {
        status: match (serving, all_ok) {
            (true, true) => "ready",
            (true, false) => "degraded",
            (false, _) => "not_ready",
        },
        checks,
        breakers,
    };
    if serving {
        HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(body)
    } else {
        // A problem document with the checks as an extension member.
        let detail = body
            .checks
            .iter()
            .filter(|(_, v)| *v != "ok")
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let (code, title) = if state.recovering() {
            ("recovering", "Recovering the order log")
        } else {
            ("not_ready", "Not ready")
        };
        HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
            .insert_header((header::CONTENT_TYPE, PROBLEM_JSON))
            .insert_header((header::RETRY_AFTER, "1"))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(serde_json::json!({
                "type": format!("urn:flashsale:problem:{code}"),
                "title": title,
                "status": 503,
                "detail": detail,
                "code": code,
                "messages_left": state.recovery.left.load(std::sync::atomic::Ordering::Acquire),
                "checks": body.checks,
                "breakers": body.breakers,
            }))
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "this document")))]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::ApiDoc::openapi())
}
