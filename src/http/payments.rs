//! `POST /api/v1/payments/webhook`: an asynchronous payment provider reports
//! the outcome of a charge. The call is authenticated by an HMAC-SHA256
//! signature over its timestamp and raw body (`Flashsale-Signature:
//! t=<unix>,v1=<hex>`), refused when stale, and idempotent: a replayed
//! delivery of the same event answers the same way and changes nothing.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::json::{parse_json, read_body};
use super::purchases::pay_approved;
use super::AppState;
use crate::domain::order::Order;
use crate::payments::{WebhookError, WebhookEvent, WebhookOutcome, SIGNATURE_HEADER};

/// What the server did with the event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookReply {
    /// `paid`, `already_paid`, `refund` (the payment lost: the reservation
    /// expired or was cancelled; give the money back) or `ignored` (a failed
    /// charge: the reservation stays until it expires or is cancelled).
    pub result: &'static str,
    pub order: Order,
}

#[utoipa::path(post, path = "/api/v1/payments/webhook", tag = "payments",
    request_body = WebhookEvent,
    params(("Flashsale-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"t.body\">")),
    responses((status = 200, body = WebhookReply),
        (status = 401, description = "invalid_signature (bad, missing or stale)", body = Problem),
        (status = 404, description = "order_not_found", body = Problem),
        (status = 422, description = "invalid_input", body = Problem),
        (status = 503, description = "unavailable: deliver again later", body = Problem)))]
pub async fn webhook(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload.into_inner()).await?;
    let header = req
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    state.webhook.verify(header, &body).map_err(|e| {
        ApiError::InvalidSignature(match e {
            WebhookError::Malformed => "missing or malformed Flashsale-Signature header",
            WebhookError::BadSignature => "the signature does not match the body",
            WebhookError::Stale => "the timestamp is outside the accepted window",
        })
    })?;
    let event: WebhookEvent = parse_json(&body)?;
    let order = match state.registry.orders.get(event.order_id) {
        Some(o) => o,
        None => state
            .db
            .order(event.order_id)
            .await?
            .ok_or(ApiError::OrderNotFound)?,
    };
    tracing::info!(event_id = %event.event_id, order_id = %order.id, outcome = ?event.outcome, "payment webhook");
    if event.outcome == WebhookOutcome::Failed {
        return Ok(HttpResponse::Ok().json(WebhookReply {
            result: "ignored",
            order,
        }));
    }
    match pay_approved(&state, &order, false).await {
        Ok((order, changed)) => Ok(HttpResponse::Ok().json(WebhookReply {
            result: if changed { "paid" } else { "already_paid" },
            order,
        })),
        Err(ApiError::ReservationExpired | ApiError::OrderCancelled) => Ok(HttpResponse::Ok()
            .json(WebhookReply {
                result: "refund",
                order,
            })),
        Err(e) => Err(e),
    }
}
