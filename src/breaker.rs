//! A circuit breaker per dependency (RabbitMQ publishing, PostgreSQL writes,
//! Redis snapshots), so that a failing dependency is tried at a measured
//! pace and its state is visible in `/readyz`, `/admin/v1/actors` and
//! `/metrics`.
//!
//! Closed: calls go through. After `threshold` failures in a row it opens:
//! calls are refused for `open_for`. Then it is half-open: one trial call
//! goes through; success closes it, failure opens it again. Small and
//! written here because the state, counts and last error must be readable
//! from outside, which the crates looked at do not expose.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

use crate::config::StorageMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// 0 closed, 1 half-open, 2 open (for a gauge).
    pub fn level(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub total_failures: u64,
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    total_failures: u64,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
    last_error: Option<String>,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        CircuitBreaker {
            threshold: threshold.max(1),
            open_for,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                total_failures: 0,
                opened_at: None,
                trial_in_flight: false,
                last_error: None,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        match self.inner.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Whether a call may go through now.
    pub fn allow(&self) -> bool {
        let open_for = self.open_for;
        self.with(|i| match i.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if i.opened_at.is_some_and(|t| t.elapsed() >= open_for) {
                    i.state = BreakerState::HalfOpen;
                    i.trial_in_flight = true;
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if i.trial_in_flight {
                    false
                } else {
                    i.trial_in_flight = true;
                    true
                }
            }
        })
    }

    pub fn record_success(&self) {
        self.with(|i| {
            i.state = BreakerState::Closed;
            i.consecutive_failures = 0;
            i.opened_at = None;
            i.trial_in_flight = false;
        });
    }

    pub fn record_failure(&self, error: impl std::fmt::Display) {
        let threshold = self.threshold;
        let error = error.to_string();
        self.with(|i| {
            i.consecutive_failures = i.consecutive_failures.saturating_add(1);
            i.total_failures += 1;
            i.last_error = Some(error);
            i.trial_in_flight = false;
            if i.state == BreakerState::HalfOpen || i.consecutive_failures >= threshold {
                i.state = BreakerState::Open;
                i.opened_at = Some(Instant::now());
            }
        });
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        self.with(|i| BreakerSnapshot {
            state: i.state,
            consecutive_failures: i.consecutive_failures,
            total_failures: i.total_failures,
            last_error: i.last_error.clone(),
        })
    }
}

/// The breakers, shared by whoever calls the dependency: the three services
/// of services mode, and the SQLite file of embedded mode.
#[derive(Debug)]
pub struct Breakers {
    pub rabbitmq: CircuitBreaker,
    pub postgres: CircuitBreaker,
    pub redis: CircuitBreaker,
    pub sqlite: CircuitBreaker,
    mode: StorageMode,
}

impl Breakers {
    pub fn new(threshold: u32, open_for: Duration, mode: StorageMode) -> Self {
        Breakers {
            rabbitmq: CircuitBreaker::new(threshold, open_for),
            postgres: CircuitBreaker::new(threshold, open_for),
            redis: CircuitBreaker::new(threshold, open_for),
            sqlite: CircuitBreaker::new(threshold, open_for),
            mode,
        }
    }

    /// The breakers of the dependencies this mode has.
    pub fn all(&self) -> Vec<(&'static str, &CircuitBreaker)> {
        match self.mode {
            StorageMode::Services => vec![
                ("rabbitmq", &self.rabbitmq),
                ("postgres", &self.postgres),
                ("redis", &self.redis),
            ],
            StorageMode::Embedded => vec![("sqlite", &self.sqlite)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_then_half_opens_for_one_trial() {
        let b = CircuitBreaker::new(3, Duration::from_millis(30));
        assert!(b.allow());
        b.record_failure("a");
        b.record_failure("b");
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        b.record_failure("c");
        let s = b.snapshot();
        assert_eq!(
            (s.state, s.consecutive_failures, s.total_failures),
            (BreakerState::Open, 3, 3)
        );
        assert_eq!(s.last_error.as_deref(), Some("c"));
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one trial after the pause");
        assert_eq!(b.snapshot().state, BreakerState::HalfOpen);
        assert!(!b.allow(), "only one trial at a time");
        b.record_failure("d");
        assert_eq!(b.snapshot().state, BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.record_success();
        let s = b.snapshot();
        assert_eq!(
            (s.state, s.consecutive_failures, s.total_failures),
            (BreakerState::Closed, 0, 4)
        );
        assert!(b.allow());
    }
}
