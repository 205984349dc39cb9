//! `POST /api/v1/payments/webhook`: an asynchronous payment provider reports
//! the outcome of a charge. The call is authenticated by an HMAC-SHA256
//! signature over its timestamp and raw body (`Flashsale-Signature:
//! t=<unix>,v1=<hex>`), refused when stale, and idempotent by `event_id`
//! (kept in PostgreSQL's `payment_events`): a replayed delivery of the same
//! event answers what the first did, changes nothing and refunds nothing.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::json::{parse_json, read_body};
use super::purchases::pay_approved;
use super::AppState;
use crate::domain::order::Order;
use crate::domain::ValidationError;
use crate::payments::{WebhookError, WebhookEvent, WebhookOutcome, SIGNATURE_HEADER};
use crate::persistence::store::EventClaim;

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
    if event.event_id.is_empty()
        || event.event_id.chars().count() > 200
        || event.event_id.chars().any(char::is_control)
    {
        return Err(ApiError::Invalid(ValidationError::new(
            "event_id",
            "must be 1 to 200 characters without control characters",
        )));
    }
    let order = current_order(&state, event.order_id).await?;
    tracing::info!(event_id = %event.event_id, order_id = %order.id, outcome = ?event.outcome, "payment webhook");
    // An event is handled once: a delivery repeated (by the provider, or
    // after a lost answer) gets the first delivery's answer, and a refund is
    // never asked for twice.
    match state
        .store
        .claim_payment_event(&event.event_id, order.id)
        .await?
    {
        EventClaim::Done(result) => {
            let result = RESULTS
                .iter()
                .find(|r| **r == result)
                .copied()
                .unwrap_or("ignored");
            return Ok(HttpResponse::Ok().json(WebhookReply { result, order }));
        }
        EventClaim::InProgress => {
            return Err(ApiError::Unavailable {
                reason: "another delivery of this event is being handled; deliver again later",
                retry_after_secs: state.retry_after_secs,
            })
        }
        EventClaim::New => {}
    }
    let handled = handle(&state, &event, order).await;
    match &handled {
        Ok(reply) => {
            state
                .store
                .finish_payment_event(&event.event_id, reply.result)
                .await?
        }
        Err(_) => {
            if let Err(e) = state.store.forget_payment_event(&event.event_id).await {
                tracing::warn!(error = %e, event_id = %event.event_id, "cannot forget a failed webhook event; it stays claimed");
            }
        }
    }
    Ok(HttpResponse::Ok().json(handled?))
}

/// Every `result` a reply may carry.
const RESULTS: [&str; 4] = ["paid", "already_paid", "refund", "ignored"];

/// The order as this process knows it, or as PostgreSQL has it.
async fn current_order(state: &AppState, id: uuid::Uuid) -> Result<Order, ApiError> {
    match state.registry.orders.get(id) {
        Some(o) => Ok(o),
        None => state.store.order(id).await?.ok_or(ApiError::OrderNotFound),
    }
}

/// Acts on a first delivery of an event.
async fn handle(
    state: &AppState,
    event: &WebhookEvent,
    order: Order,
) -> Result<WebhookReply, ApiError> {
    if event.outcome == WebhookOutcome::Failed {
        return Ok(WebhookReply {
            result: "ignored",
            order,
        });
    }
    match pay_approved(state, &order, false).await {
        Ok((order, changed)) => Ok(WebhookReply {
            result: if changed { "paid" } else { "already_paid" },
            order,
        }),
        Err(ApiError::ReservationExpired | ApiError::OrderCancelled) => Ok(WebhookReply {
            result: "refund",
            order: current_order(state, order.id).await.unwrap_or(order),
        }),
        Err(e) => Err(e),
    }
}
