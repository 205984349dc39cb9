//! Layered configuration.
//!
//! The shipped `config.toml` is compiled in as the bottom layer, so every key
//! always has a documented default; a file given on the command line (or
//! `./config.toml`), `FLASHSALE__SECTION__KEY` environment variables and CLI
//! flags override it in that order. Every struct denies unknown fields: a
//! misspelt key is an error at start-up, not a silently ignored setting.
//! Secrets are [`SecretString`]s, whose `Debug` output is redacted.

use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;

/// The configuration file as shipped, the lowest layer.
pub const SHIPPED_CONFIG: &str = include_str!("../config.toml");

/// Environment variables starting with this prefix (then `__`) override keys.
pub const ENV_PREFIX: &str = "FLASHSALE";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub rabbitmq: RabbitSettings,
    pub limits: LimitSettings,
    pub breakers: BreakerSettings,
    pub stock: StockSettings,
    pub orders: OrderSettings,
    pub auth: AuthSettings,
    pub sales: SalesSettings,
    pub payments: PaymentSettings,
    pub telemetry: TelemetrySettings,
    pub events: EventSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub publish_interval_ms: u64,
    pub keepalive_secs: u64,
    pub max_streams: usize,
    pub max_streams_per_ip: u32,
    pub max_deliveries_per_sec: u64,
    pub admin_interval_ms: u64,
    pub ticket_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub client_request_timeout_ms: u64,
    pub keep_alive_secs: u64,
    pub max_connections_per_worker: usize,
    pub backlog: u32,
    pub shutdown_timeout_secs: u64,
    pub readiness_cache_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub mode: StorageMode,
    pub path: std::path::PathBuf,
    pub read_connections: usize,
    pub busy_timeout_ms: u64,
    pub checkpoint_pages: u32,
    pub cache_mib: u32,
}

/// Where the order log and the store live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// One SQLite file is the order log and the store; nothing to install.
    Embedded,
    /// RabbitMQ (the order log), PostgreSQL (the store), Redis (snapshots).
    Services,
}

impl StorageMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::Embedded => "embedded",
            StorageMode::Services => "services",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub create_if_missing: bool,
    pub pool_size: u32,
    pub connect_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: SecretString,
    pub key_prefix: String,
    pub pool_size: u32,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSettings {
    pub url: SecretString,
    pub queue: String,
    pub dead_letter_queue: String,
    pub connect_timeout_ms: u64,
    pub batch_max_delay_us: u64,
    pub batch_gather_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub per_ip_per_second: u32,
    pub per_ip_burst: u32,
    pub purchases_per_user_per_second: u32,
    pub purchases_per_user_burst: u32,
    pub trusted_proxies: Vec<String>,
    pub evict_interval_secs: u64,
    pub logins_per_ip_per_minute: u32,
    pub logins_per_username_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub open_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockSettings {
    pub mailbox_capacity: usize,
    pub snapshot_interval_ms: u64,
    pub retry_after_secs: u32,
    pub expiry_tick_ms: u64,
    pub idle_stop_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    pub provider: PaymentProviderKind,
    pub webhook_secret: SecretString,
    pub webhook_tolerance_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentProviderKind {
    Simulated,
    Webhook,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderSettings {
    pub batch_max_orders: usize,
    pub batch_max_delay_us: u64,
    pub batch_gather_us: u64,
    pub max_unconfirmed_batches: usize,
    pub publish_queue_capacity: usize,
    pub max_queue_depth: u32,
    pub confirm_timeout_ms: u64,
    pub writers: usize,
    pub writer_prefetch: u16,
    pub writer_gather_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    pub recovery_drain_warn_secs: u64,
    pub directory_evict_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub jwt_secret: SecretString,
    pub jwt_issuer: String,
    pub token_ttl_secs: u64,
    pub token_cache_per_worker: usize,
    pub admin_token: SecretString,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    pub password_hash_threads: usize,
    pub password_hash_queue: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesSettings {
    pub default_currency: String,
    pub default_per_user_limit: u32,
    pub default_reservation_ttl_secs: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_filter: String,
    pub log_format: LogFormat,
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags given on the command line; they win over every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
}

impl Settings {
    /// Loads the layers: shipped defaults, then `file` (which must exist when
    /// given), then the environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, config::ConfigError> {
        Self::load_from(file, overrides, true)
    }

    /// Loads the layers without reading the process environment (for tests
    /// that must not be influenced by the caller's variables).
    pub fn load_without_env(
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Self, config::ConfigError> {
        Self::load_from(file, overrides, false)
    }

    fn load_from(
        file: Option<&Path>,
        overrides: &Overrides,
        read_env: bool,
    ) -> Result<Self, config::ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            SHIPPED_CONFIG,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        if read_env {
            builder = builder.add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            );
        }
        if let Some(host) = &overrides.host {
            builder = builder.set_override("server.host", host.clone())?;
        }
        if let Some(port) = overrides.port {
            builder = builder.set_override("server.port", i64::from(port))?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks that hold across keys or that serde cannot express.
    fn validate(&self) -> Result<(), config::ConfigError> {
        let fail = |msg: &str| Err(config::ConfigError::Message(msg.to_owned()));
        if !crate::domain::sale::is_currency_code(&self.sales.default_currency) {
            return fail("sales.default_currency must be three capital letters (ISO 4217)");
        }
        if self.sales.default_per_user_limit == 0 {
            return fail("sales.default_per_user_limit must be at least 1");
        }
        if self.sales.default_reservation_ttl_secs == 0 {
            return fail("sales.default_reservation_ttl_secs must be at least 1");
        }
        if self.database.pool_size == 0 || self.redis.pool_size == 0 {
            return fail("database.pool_size and redis.pool_size must be at least 1");
        }
        if self.redis.key_prefix.is_empty() {
            return fail("redis.key_prefix must not be empty");
        }
        let o = &self.orders;
        if o.batch_max_orders == 0
            || o.max_unconfirmed_batches == 0
            || o.publish_queue_capacity == 0
            || o.writers == 0
            || o.writer_prefetch == 0
        {
            return fail("orders.batch_max_orders, max_unconfirmed_batches, publish_queue_capacity, writers and writer_prefetch must be at least 1");
        }
        if o.writer_gather_ms > 1000 {
            return fail("orders.writer_gather_ms must be at most 1000");
        }
        // A batch that waits as long as a purchase waits for its confirm
        // would answer every purchase of a rush 503.
        let confirm_us = o.confirm_timeout_ms.saturating_mul(1000);
        let r = &self.rabbitmq;
        if o.batch_max_delay_us.saturating_add(o.batch_gather_us) >= confirm_us
            || r.batch_max_delay_us.saturating_add(r.batch_gather_us) >= confirm_us
        {
            return fail("orders.batch_max_delay_us + orders.batch_gather_us and rabbitmq.batch_max_delay_us + rabbitmq.batch_gather_us must be shorter than orders.confirm_timeout_ms");
        }
        if self.storage.read_connections == 0 {
            return fail("storage.read_connections must be at least 1");
        }
        if self.storage.path.as_os_str().is_empty() {
            return fail("storage.path must not be empty");
        }
        if self.stock.mailbox_capacity == 0 {
            return fail("stock.mailbox_capacity must be at least 1");
        }
        if self.server.max_body_bytes < 64 {
            return fail("server.max_body_bytes must be at least 64");
        }
        Ok(())
    }
}

/// The shortest secret accepted off loopback, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// A secret that must not guard a server others can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeakSecret {
    /// The key, e.g. `auth.jwt_secret`.
    pub key: &'static str,
    pub why: &'static str,
}

impl Settings {
    /// The secrets that are empty, shorter than [`MIN_SECRET_BYTES`], or the
    /// value shipped in `config.toml` (which anyone can read). The webhook
    /// secret counts only when the webhook provider is on.
    pub fn weak_secrets(&self) -> Vec<WeakSecret> {
        use secrecy::ExposeSecret;
        let shipped = Settings::load_without_env(None, &Overrides::default()).ok();
        let mut candidates = vec![
            (
                "auth.jwt_secret",
                &self.auth.jwt_secret,
                shipped.as_ref().map(|s| s.auth.jwt_secret.clone()),
            ),
            (
                "auth.admin_token",
                &self.auth.admin_token,
                shipped.as_ref().map(|s| s.auth.admin_token.clone()),
            ),
        ];
        if self.payments.provider == PaymentProviderKind::Webhook {
            candidates.push((
                "payments.webhook_secret",
                &self.payments.webhook_secret,
                shipped.as_ref().map(|s| s.payments.webhook_secret.clone()),
            ));
        }
        candidates
            .into_iter()
            .filter_map(|(key, value, shipped)| {
                let value = value.expose_secret();
                let why = if value.is_empty() {
                    "is empty"
                } else if shipped.is_some_and(|s| s.expose_secret() == value) {
                    "is the value shipped in config.toml"
                } else if value.len() < MIN_SECRET_BYTES {
                    "is shorter than 32 bytes"
                } else {
                    return None;
                };
                Some(WeakSecret { key, why })
            })
            .collect()
    }

    /// Whether the server listens on the loopback interface only.
    pub fn loopback_only(&self) -> bool {
        let host = self
            .server
            .host
            .trim_start_matches('[')
            .trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Fresh random values for every secret, as environment lines a deployment
/// can keep (`flashsale secrets`).
pub fn fresh_secrets() -> String {
    use rand::RngCore;
    let line = |key: &str| {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        format!("{ENV_PREFIX}__{key}={}\n", hex::encode(bytes))
    };
    [
        line("AUTH__JWT_SECRET"),
        line("AUTH__ADMIN_TOKEN"),
        line("PAYMENTS__WEBHOOK_SECRET"),
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_loads() {
        let settings = Settings::load_without_env(None, &Overrides::default());
        let settings = match settings {
            Ok(s) => s,
            Err(e) => panic!("shipped config.toml does not load: {e}"),
        };
        assert_eq!(settings.server.port, 8080);
        assert_eq!(settings.telemetry.log_format, LogFormat::Text);
    }

    #[test]
    fn secrets_do_not_print() {
        let settings = Settings::load_without_env(None, &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let printed = format!("{settings:?}");
        assert!(!printed.contains("change-me-admin-token"), "{printed}");
        assert!(!printed.contains("guest:guest"), "{printed}");
    }

    #[test]
    fn shipped_empty_and_short_secrets_are_weak() {
        let mut s = Settings::load_without_env(None, &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let keys = |s: &Settings| {
            s.weak_secrets()
                .into_iter()
                .map(|w| w.key)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&s), ["auth.jwt_secret", "auth.admin_token"]);
        assert!(s.loopback_only());
        s.payments.provider = PaymentProviderKind::Webhook;
        assert_eq!(keys(&s).len(), 3);
        s.auth.jwt_secret = SecretString::from("");
        assert_eq!(s.weak_secrets()[0].why, "is empty");
        s.auth.jwt_secret = SecretString::from("short");
        assert_eq!(s.weak_secrets()[0].why, "is shorter than 32 bytes");
        for line in fresh_secrets().lines() {
            let (key, value) = line.split_once('=').unwrap_or_default();
            assert!(key.starts_with("FLASHSALE__"), "{line}");
            assert_eq!(value.len(), 64, "{line}");
        }
        let fresh = |k: &str| {
            fresh_secrets()
                .lines()
                .find_map(|l| {
                    l.strip_prefix(k)
                        .map(|v| v.trim_start_matches('=').to_owned())
                })
                .map(SecretString::from)
                .unwrap_or_else(|| panic!("{k}"))
        };
        s.auth.jwt_secret = fresh("FLASHSALE__AUTH__JWT_SECRET");
        s.auth.admin_token = fresh("FLASHSALE__AUTH__ADMIN_TOKEN");
        s.payments.webhook_secret = fresh("FLASHSALE__PAYMENTS__WEBHOOK_SECRET");
        assert_eq!(keys(&s), Vec::<&str>::new());
        s.server.host = "0.0.0.0".into();
        assert!(!s.loopback_only());
        s.server.host = "::1".into();
        assert!(s.loopback_only());
    }

    #[test]
    fn a_batch_delay_and_gather_must_be_shorter_than_the_confirm_timeout() {
        let mut s = Settings::load_without_env(None, &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(s.validate().is_ok());
        s.rabbitmq.batch_max_delay_us = s.orders.confirm_timeout_ms * 1000;
        assert!(s.validate().is_err());
        s.rabbitmq.batch_max_delay_us = 5000;
        s.orders.batch_max_delay_us = s.orders.confirm_timeout_ms * 1000 + 1;
        assert!(s.validate().is_err());
        // The gather comes on top of the delay.
        s.orders.batch_max_delay_us = 5000;
        assert!(s.validate().is_ok());
        s.rabbitmq.batch_gather_us = s.orders.confirm_timeout_ms * 1000 - 5000;
        assert!(s.validate().is_err());
        s.rabbitmq.batch_gather_us = 1000;
        s.orders.batch_gather_us = s.orders.confirm_timeout_ms * 1000;
        assert!(s.validate().is_err());
    }

    #[test]
    fn cli_overrides_win() {
        let overrides = Overrides {
            host: Some("0.0.0.0".into()),
            port: Some(9999),
        };
        let settings =
            Settings::load_without_env(None, &overrides).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.server.port, 9999);
        assert_eq!(settings.server.host, "0.0.0.0");
    }
}
