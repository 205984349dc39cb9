//! flashsale: a flash-sale server.
//!
//! Shoppers buy a small stock from a huge crowd in the same second. The
//! promise, in order: never oversell, never lose an acknowledged order, never
//! sell twice to one buyer; then be as fast as the machine allows.
//!
//! # Layout
//! - [`config`]: layered settings (`config.toml`, environment, flags).
//! - [`domain`]: the rules as plain data, with unit tests.
//! - [`actors`]: the stock actors (one per sale) and their registry.
//! - [`order_log`]: the group commit that makes decisions durable, its
//!   sinks (SQLite, RabbitMQ), the writers into PostgreSQL and recovery.
//! - [`persistence`]: the store (SQLite or PostgreSQL), Redis and RabbitMQ.
//! - [`http`]: routes, extractors, and errors mapped to problem answers.
//! - [`startup`]: [`startup::Application`], used by the binary and the tests.
//!
//! See `ARCHITECTURE.md` at the repository root for the data flow.

pub mod actors;
pub mod auth;
pub mod breaker;
pub mod config;
pub mod domain;
pub mod http;
pub mod live;
pub mod metrics;
pub mod order_log;
pub mod payments;
pub mod persistence;
pub mod startup;
pub mod state_metrics;
pub mod telemetry;
