//! Redis: where stock actors publish snapshots of their live state.
//!
//! Redis is never the source of truth: losing it loses no order. The pool
//! checks a connection on checkout (a PING) because snapshots are written at
//! most every few milliseconds per sale, far off the purchase path, and a
//! connection that died with a Redis restart must be replaced, not reused.

use std::time::Duration;

use bb8_redis::{redis, RedisConnectionManager};
use secrecy::ExposeSecret;

use super::{redact_url, Unreachable};
use crate::config::RedisSettings;

/// A pooled Redis client that knows the key prefix it writes under.
#[derive(Clone)]
pub struct RedisStore {
    pool: bb8::Pool<RedisConnectionManager>,
    prefix: String,
    /// How long one command may take (`redis.connect_timeout_ms`): a Redis
    /// that stops answering must not hold a snapshot forever.
    deadline: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("no Redis connection available in time")]
    Unavailable,
    #[error("Redis did not answer in time")]
    TimedOut,
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

impl From<bb8::RunError<redis::RedisError>> for RedisError {
    fn from(e: bb8::RunError<redis::RedisError>) -> Self {
        match e {
            bb8::RunError::User(e) => e.into(),
            bb8::RunError::TimedOut => RedisError::Unavailable,
        }
    }
}

impl RedisStore {
    pub async fn connect(settings: &RedisSettings) -> Result<Self, Unreachable> {
        let url = settings.url.expose_secret();
        let unreachable =
            |e: &dyn std::fmt::Display| Unreachable::new("Redis", redact_url(url), "redis.url", e);
        let manager = RedisConnectionManager::new(url).map_err(|e| unreachable(&e))?;
        let pool = bb8::Pool::builder()
            .max_size(settings.pool_size)
            .connection_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .test_on_check_out(true)
            .build(manager)
            .await
            .map_err(|e| unreachable(&e))?;
        let store = RedisStore {
            pool,
            prefix: settings.key_prefix.clone(),
            deadline: Duration::from_millis(settings.connect_timeout_ms),
        };
        store.ping().await.map_err(|e| unreachable(&e))?;
        Ok(store)
    }

    /// The full key for `suffix` under this store's prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{}", self.prefix, suffix)
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.pool.get().await?;
        let _: String = redis::cmd("PING").query_async(&mut *conn).await?;
        Ok(())
    }

    /// Writes the fields of a hash in one round trip, within the deadline.
    pub async fn write_hash(&self, key: &str, fields: &[(&str, String)]) -> Result<(), RedisError> {
        let write = async {
            let mut conn = self.pool.get().await?;
            let mut cmd = redis::cmd("HSET");
            cmd.arg(key);
            for (f, v) in fields {
                cmd.arg(*f).arg(v);
            }
            let _: i64 = cmd.query_async(&mut *conn).await?;
            Ok(())
        };
        tokio::time::timeout(self.deadline, write)
            .await
            .unwrap_or(Err(RedisError::TimedOut))
    }

    /// Reads a hash (empty when the key does not exist).
    pub async fn read_hash(
        &self,
        key: &str,
    ) -> Result<std::collections::HashMap<String, String>, RedisError> {
        let mut conn = self.pool.get().await?;
        Ok(redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut *conn)
            .await?)
    }
}
