//! Everything that talks to a storage engine or a service: SQLite
//! (embedded mode), PostgreSQL, Redis and RabbitMQ (services mode).
//!
//! Each gets one module that owns its connection set-up, its errors and its
//! statements, so the rest of the code never sees a driver type. The
//! [`store::Store`] trait is what the rest asks of the source of truth.

pub mod postgres;
pub mod rabbit;
pub mod redis;
pub mod sqlite;
pub mod store;

/// A service could not be reached at start-up. Its message names the
/// service, the address (never the credentials) and the key to change.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {service} at {address} (check `{key}` in config.toml or FLASHSALE__{env_key}): {reason}")]
pub struct Unreachable {
    pub service: &'static str,
    pub address: String,
    pub key: &'static str,
    pub env_key: String,
    pub reason: String,
}

impl Unreachable {
    pub fn new(
        service: &'static str,
        address: String,
        key: &'static str,
        reason: impl std::fmt::Display,
    ) -> Self {
        Self {
            service,
            address,
            key,
            env_key: key.to_uppercase().replace('.', "__"),
            reason: reason.to_string(),
        }
    }
}

/// The part of a URL after the credentials, for messages: `scheme://host:port/path`.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{rest}")
        }
        None => "<unparsable url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_credentials() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("nonsense"), "<unparsable url>");
    }

    #[test]
    fn unreachable_names_service_and_key() {
        let e = Unreachable::new("Redis", "redis://h:1".into(), "redis.url", "refused");
        let text = e.to_string();
        assert!(text.contains("Redis"), "{text}");
        assert!(text.contains("redis.url"), "{text}");
        assert!(text.contains("FLASHSALE__REDIS__URL"), "{text}");
    }
}
