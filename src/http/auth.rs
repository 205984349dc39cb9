//! Extractors that say who is calling: a shopper (bearer JWT) or an admin
//! (the configured admin token). Handlers that take one cannot run without it.

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::{ready, Ready};
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;

fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("application state missing")))
}

/// A shopper whose bearer token verified.
#[derive(Debug, Clone, Copy)]
pub struct Shopper {
    pub user_id: Uuid,
}

impl FromRequest for Shopper {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = state(req)?;
            let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
            match state.tokens.verify(token) {
                Ok(user_id) => Ok(Shopper { user_id }),
                Err(e) => {
                    tracing::debug!(error = %e, "token refused");
                    Err(ApiError::Unauthenticated)
                }
            }
        })())
    }
}

/// A caller that presented the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = state(req)?;
            let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
            if state.admin_token.matches(token) {
                Ok(Admin)
            } else {
                Err(ApiError::Unauthenticated)
            }
        })())
    }
}
