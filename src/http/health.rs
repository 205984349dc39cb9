//! Liveness, readiness and the OpenAPI document.
//!
//! `/healthz` answers while the process lives (it touches nothing, so it is
//! also the ceiling that benchmarks compare against). `/readyz` is ready only
//! once recovery is done and PostgreSQL, Redis and RabbitMQ all answer.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::error::PROBLEM_JSON;
use super::AppState;
use crate::breaker::BreakerSnapshot;

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

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready or degraded", body = Readiness),
        (status = 503, description = "not ready: recovering, shutting down, or no order log", body = Readiness)))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (postgres, redis, rabbitmq) = tokio::join!(
        check(state.db.ping()),
        check(state.redis.ping()),
        check(async { state.pipeline_health() }),
    );
    let mut checks = std::collections::BTreeMap::new();
    checks.insert("postgres", postgres);
    checks.insert("redis", redis);
    checks.insert("rabbitmq", rabbitmq);
    checks.insert("recovery", state.recovery_status());
    let breakers = state
        .breakers
        .all()
        .into_iter()
        .map(|(name, b)| (name, b.snapshot()))
        .collect();
    // Purchases need recovery and the order log; PostgreSQL and Redis may be
    // away for a while without refusing a single purchase.
    let serving = checks["recovery"] == "ok" && checks["rabbitmq"] == "ok";
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
        HttpResponse::Ok().json(body)
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
