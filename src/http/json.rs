//! A JSON body extractor whose failures are problem answers that say what is
//! wrong: 415 for another content type, 413 past the size limit, 400 for
//! broken JSON, and 422 naming the field for a value of the wrong type,
//! a missing field or an unknown one.

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest};
use futures_util::{future::LocalBoxFuture, StreamExt};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::domain::ValidationError;

/// The most bytes a body may have; registered as app data by `http::configure`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A deserialised JSON body.
pub struct ApiJson<T>(pub T);

/// Whether the body is declared JSON: `application/json` or `application/*+json`.
pub(crate) fn is_json(req: &HttpRequest) -> bool {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence
                .get(..12)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/"))
            && essence.to_ascii_lowercase().ends_with("+json"))
}

/// Reads the whole body, refusing it as soon as it passes the configured
/// limit (`server.max_body_bytes`, registered as [`BodyLimit`]).
pub(crate) async fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
) -> Result<Vec<u8>, ApiError> {
    let limit = req.app_data::<BodyLimit>().map_or(16 * 1024, |l| l.0);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::MalformedJson(format!("body not readable: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads and drops what is left of a body a refusal did not need, up to
/// `limit` bytes and for at most `within`: actix closes a connection whose
/// request body was left unread, so without this every refused request
/// (429, 401, ...) would cost its client a new TCP connection. A body past
/// the limit, or slower than `within`, is left: that connection closes.
pub(crate) async fn discard_body(payload: &mut Payload, limit: usize, within: std::time::Duration) {
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = payload.next().await {
            seen += chunk.len();
            if seen > limit {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

/// Parses `body`, mapping every failure to the answer a client can act on.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A type error can surface before the decoder reaches a syntax error
        // further on; broken JSON is a 400 whatever came first.
        let syntax_ok = serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
        match inner.classify() {
            serde_json::error::Category::Data if syntax_ok => {
                let field = if path == "." { "body".to_owned() } else { path };
                ApiError::Invalid(ValidationError::new(field, inner.to_string()))
            }
            _ => ApiError::MalformedJson(inner.to_string()),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::MalformedJson(format!("trailing characters: {e}")))?;
    Ok(value)
}

impl<T: DeserializeOwned + 'static> FromRequest for ApiJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json(&req) {
                return Err(ApiError::UnsupportedMediaType);
            }
            let body = read_body(&req, &mut payload).await?;
            parse_json(&body).map(ApiJson)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    #[test]
    fn errors_name_the_field() {
        match parse_json::<Body>(br#"{"name":"a","count":"x"}"#) {
            Err(ApiError::Invalid(e)) => assert_eq!(e.field, "count"),
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"name":"a","count":1,"extra":2}"#) {
            Err(ApiError::Invalid(e)) => assert!(e.message.contains("extra"), "{e}"),
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"name":"a""#) {
            Err(ApiError::MalformedJson(_)) => {}
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"name":"a","count":1} x"#) {
            Err(ApiError::MalformedJson(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(parse_json::<Body>(br#"{"name":"a","count":1}"#).is_ok());
    }
}
