//! Integration tests against the real PostgreSQL, Redis and RabbitMQ.
//! One binary with modules: one link instead of one per file.

mod helpers;

mod admin_sales;
mod config;
mod crash;
mod events;
mod faults;
mod hostile;
mod http_conventions;
mod lifecycle;
mod memory;
mod observability;
mod pipeline;
mod protection;
mod proxy;
mod purchases;
mod startup;
mod users;
