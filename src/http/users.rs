//! Shopper accounts and sessions: register, then log in for a bearer token.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, Problem};
use super::json::ApiJson;
use super::AppState;
use crate::domain::user::{validate_password, validate_username};
use crate::persistence::postgres::StoreError;

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

#[utoipa::path(post, path = "/api/v1/users", tag = "shoppers", request_body = Credentials,
    responses((status = 201, body = UserView),
        (status = 409, description = "username_taken", body = Problem),
        (status = 422, description = "invalid_input", body = Problem)))]
pub async fn register(
    state: web::Data<AppState>,
    body: ApiJson<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let Credentials { username, password } = body.0;
    validate_username(&username)?;
    validate_password(&password)?;
    let state2 = state.clone();
    // Hashing is deliberately slow: keep it off the HTTP worker's event loop.
    let hash = web::block(move || state2.passwords.hash(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(anyhow::anyhow!("hashing failed: {e}")))?;
    let id = Uuid::new_v4();
    match state.db.insert_user(id, &username, &hash).await {
        Ok(()) => Ok(HttpResponse::Created().json(UserView { id, username })),
        Err(StoreError::Duplicate(_)) => Err(ApiError::UsernameTaken),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/api/v1/sessions", tag = "shoppers", request_body = Credentials,
    responses((status = 200, body = SessionView),
        (status = 401, description = "invalid_credentials", body = Problem)))]
pub async fn login(
    state: web::Data<AppState>,
    body: ApiJson<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let Credentials { username, password } = body.0;
    let found = state.db.user_credentials(&username).await?;
    let state2 = state.clone();
    let (user_id, ok) = web::block(move || match found {
        Some((id, hash)) => (Some(id), state2.passwords.verify(&password, Some(&hash))),
        None => (None, state2.passwords.verify(&password, None)),
    })
    .await
    .map_err(ApiError::internal)?;
    let user_id = match (user_id, ok) {
        (Some(id), true) => id,
        _ => return Err(ApiError::InvalidCredentials),
    };
    let (token, expires_at) = state.tokens.issue(user_id).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(SessionView { token, expires_at }))
}
