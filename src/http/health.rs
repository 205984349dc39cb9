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

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each dependency and recovery: `ok`, or what is wrong.
    pub checks: std::collections::BTreeMap<&'static str, String>,
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
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
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
    let ready = checks.values().all(|v| v == "ok");
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        checks,
    };
    if ready {
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
        HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
            .insert_header((header::CONTENT_TYPE, PROBLEM_JSON))
            .insert_header((header::RETRY_AFTER, "1"))
            .json(serde_json::json!({
                "type": "urn:flashsale:problem:not_ready",
                "title": "Not ready",
                "status": 503,
                "detail": detail,
                "code": "not_ready",
                "checks": body.checks,
            }))
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "this document")))]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::ApiDoc::openapi())
}
