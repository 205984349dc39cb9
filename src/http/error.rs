//! The one place where errors become HTTP answers.
//!
//! Every handler returns [`ApiError`]; domain and store errors convert into
//! it. Each variant has a status, a stable snake_case `code` that clients
//! branch on, and a detail safe to show. 5xx answers say nothing internal:
//! the cause chain goes to the log only.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::PasswordBusy;
use crate::domain::sale_book::Rejection;
use crate::domain::ValidationError;
use crate::persistence::store::StoreError;

/// The `application/problem+json` body (RFC 9457) with our `code` member.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:flashsale:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable word; see the API docs for the list.
    pub code: &'static str,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("missing, invalid or expired credentials")]
    Unauthenticated,
    #[error("unknown username or wrong password")]
    InvalidCredentials,
    #[error("that username is taken")]
    UsernameTaken,
    #[error("no such sale")]
    SaleNotFound,
    #[error("no such order")]
    OrderNotFound,
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("{0}")]
    InvalidTransition(String),
    #[error("{}", rejection_detail(.0))]
    Rejected(Rejection),
    #[error("the reservation has expired")]
    ReservationExpired,
    #[error("the order was cancelled")]
    OrderCancelled,
    #[error("the order is paid")]
    OrderPaid,
    #[error("{0}")]
    PaymentDeclined(String),
    #[error("{0}")]
    InvalidSignature(&'static str),
    #[error("request headers larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("too many requests from you; retry after the time in Retry-After")]
    RateLimited { retry_after_secs: u32 },
    #[error("too many requests are waiting; retry shortly")]
    Overloaded { retry_after_secs: u32 },
    #[error("the service is unavailable: {reason}")]
    Unavailable {
        reason: &'static str,
        retry_after_secs: u32,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_input",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::UsernameTaken => "username_taken",
            ApiError::SaleNotFound => "sale_not_found",
            ApiError::OrderNotFound => "order_not_found",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidTransition(_) => "invalid_transition",
            ApiError::Rejected(r) => match r {
                Rejection::NotStarted => "not_started",
                Rejection::Ended => "ended",
                Rejection::Paused => "paused",
                Rejection::SoldOut { .. } => "sold_out",
                Rejection::LimitReached { .. } => "limit_reached",
                Rejection::KeyReused => "idempotency_key_reused",
            },
            ApiError::ReservationExpired => "reservation_expired",
            ApiError::OrderCancelled => "order_cancelled",
            ApiError::OrderPaid => "order_paid",
            ApiError::PaymentDeclined(_) => "payment_declined",
            ApiError::InvalidSignature(_) => "invalid_signature",
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "Invalid input",
            ApiError::MalformedJson(_) => "Malformed JSON",
            ApiError::UnsupportedMediaType => "Unsupported media type",
            ApiError::PayloadTooLarge { .. } => "Payload too large",
            ApiError::Unauthenticated => "Unauthenticated",
            ApiError::InvalidCredentials => "Invalid credentials",
            ApiError::UsernameTaken => "Username taken",
            ApiError::SaleNotFound => "Sale not found",
            ApiError::OrderNotFound => "Order not found",
            ApiError::NotFound => "Not found",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::InvalidTransition(_) => "Invalid transition",
            ApiError::Rejected(r) => match r {
                Rejection::NotStarted => "Sale not started",
                Rejection::Ended => "Sale ended",
                Rejection::Paused => "Sale paused",
                Rejection::SoldOut { .. } => "Sold out",
                Rejection::LimitReached { .. } => "Limit reached",
                Rejection::KeyReused => "Idempotency key reused",
            },
            ApiError::ReservationExpired => "Reservation expired",
            ApiError::OrderCancelled => "Order cancelled",
            ApiError::OrderPaid => "Order paid",
            ApiError::PaymentDeclined(_) => "Payment declined",
            ApiError::InvalidSignature(_) => "Invalid signature",
            ApiError::HeadersTooLarge { .. } => "Headers too large",
            ApiError::RateLimited { .. } => "Rate limited",
            ApiError::Overloaded { .. } => "Overloaded",
            ApiError::Unavailable { .. } => "Service unavailable",
            ApiError::Internal(_) => "Internal error",
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Unavailable {
                retry_after_secs, ..
            }
            | ApiError::Overloaded { retry_after_secs }
            | ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

fn rejection_detail(r: &Rejection) -> String {
    match r {
        Rejection::NotStarted => "the sale has not started yet".to_owned(),
        Rejection::Ended => "the sale has ended".to_owned(),
        Rejection::Paused => "the sale is paused".to_owned(),
        Rejection::SoldOut { left: 0 } => "the sale is sold out".to_owned(),
        Rejection::SoldOut { left } => format!("only {left} units are left"),
        Rejection::KeyReused => "this Idempotency-Key was used before with another quantity or on another sale; use a fresh key for a new purchase".to_owned(),
        Rejection::LimitReached { held, limit } => {
            format!("you hold {held} of the {limit} units one buyer may have")
        }
    }
}

impl ApiError {
    /// The password pool could not take a hash now.
    pub fn from_busy(busy: PasswordBusy, retry_after_secs: u32) -> Self {
        match busy {
            PasswordBusy::Full => ApiError::Overloaded { retry_after_secs },
            PasswordBusy::Stopped => ApiError::Unavailable {
                reason: "the server is shutting down",
                retry_after_secs,
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable => ApiError::Unavailable {
                reason: "the database is unreachable",
                retry_after_secs: 1,
            },
            other => ApiError::internal(other),
        }
    }
}

/// Builds a problem answer; also used for answers that do not come from an
/// `ApiError` (readiness, method-not-allowed).
pub fn problem_response(
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    retry_after_secs: Option<u32>,
) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    builder.insert_header((header::CONTENT_TYPE, PROBLEM_JSON));
    if let Some(secs) = retry_after_secs {
        builder.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    builder.json(Problem {
        kind: format!("urn:flashsale:problem:{code}"),
        title,
        status: status.as_u16(),
        detail,
        code,
    })
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::Rejected(Rejection::KeyReused) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthenticated | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::UsernameTaken | ApiError::InvalidTransition(_) => StatusCode::CONFLICT,
            ApiError::SaleNotFound | ApiError::OrderNotFound | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Rejected(_)
            | ApiError::ReservationExpired
            | ApiError::OrderCancelled
            | ApiError::OrderPaid => StatusCode::CONFLICT,
            ApiError::PaymentDeclined(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::InvalidSignature(_) => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable { .. } | ApiError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let detail = match self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                "The server could not complete the request; it has been logged.".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = problem_response(
            status,
            self.code(),
            self.title(),
            detail,
            self.retry_after(),
        );
        if matches!(self, ApiError::Unauthenticated) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
