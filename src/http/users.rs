//! Shopper accounts and sessions: register, then log in for a bearer token.

use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::json::ApiJson;
use super::{AppState, ClientIp};
use crate::domain::user::{validate_password, validate_username};
use crate::persistence::store::StoreError;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub username: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Password work from this address (and, for a login, on this username)
/// within its quota.
fn check_login_quota(
    state: &AppState,
    req: &HttpRequest,
    username: Option<&str>,
) -> Result<(), ApiError> {
    let ip = req.extensions().get::<ClientIp>().map(|c| c.0);
    state
        .limits
        .check_login(ip, username)
        .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })
}

#[utoipa::path(post, path = "/api/v1/users", tag = "shoppers", request_body = Credentials,
    responses((status = 201, body = UserView),
        (status = 409, description = "username_taken", body = Problem),
        (status = 422, description = "invalid_input", body = Problem),
        (status = 429, description = "rate_limited", body = Problem),
        (status = 503, description = "overloaded: every password hasher is busy", body = Problem)))]
pub async fn register(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: ApiJson<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let Credentials { username, password } = body.0;
    validate_username(&username)?;
    validate_password(&password)?;
    check_login_quota(&state, &req, None)?;
    let busy = |b| ApiError::from_busy(b, state.retry_after_secs);
    // A place for the hash first: past the pool's capacity the answer costs
    // no query. A taken name costs no hash (the unique index still decides
    // a race).
    let slot = state.passwords.reserve().map_err(busy)?;
    if state.store.user_credentials(&username).await?.is_some() {
        return Err(ApiError::UsernameTaken);
    }
    let hash = slot.hash(password).await.map_err(busy)?;
    let id = Uuid::new_v4();
    match state.store.insert_user(id, &username, &hash).await {
        Ok(()) => Ok(HttpResponse::Created().json(UserView { id, username })),
        Err(StoreError::Duplicate(_)) => Err(ApiError::UsernameTaken),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/api/v1/sessions", tag = "shoppers", request_body = Credentials,
    responses((status = 200, body = SessionView),
        (status = 401, description = "invalid_credentials", body = Problem),
        (status = 429, description = "rate_limited", body = Problem),
        (status = 503, description = "overloaded: every password hasher is busy", body = Problem)))]
pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: ApiJson<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let Credentials { username, password } = body.0;
    // A name no account can have is invalid input (naming the field); a
    // password no account can have is simply wrong. Neither costs a hash or
    // a query (the rules are public: nothing to learn from the timing).
    validate_username(&username)?;
    if validate_password(&password).is_err() {
        return Err(ApiError::InvalidCredentials);
    }
    check_login_quota(&state, &req, Some(&username))?;
    let busy = |b| ApiError::from_busy(b, state.retry_after_secs);
    let slot = state.passwords.reserve().map_err(busy)?;
    let (user_id, hash) = state.store.user_credentials(&username).await?.unzip();
    let ok = slot.verify(password, hash).await.map_err(busy)?;
    let user_id = match (user_id, ok) {
        (Some(id), true) => id,
        _ => return Err(ApiError::InvalidCredentials),
    };
    let (token, expires_at) = state.tokens.issue(user_id).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(SessionView { token, expires_at }))
}
