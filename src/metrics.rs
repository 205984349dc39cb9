//! Prometheus metrics: every name in [`name`], one [`Registry`] built by
//! `Application::build` and passed in (no global registry).
//!
//! Two kinds. Events on the hot path (HTTP requests, purchase outcomes,
//! batch sizes and latencies) are metric objects updated where they happen.
//! State that the actors, the publisher and the writers already keep in
//! atomics (stock left, mailbox depth, queue depth, rows written, dead
//! letters...) is read at scrape time by
//! [`crate::state_metrics::StateCollector`], a module of its own (it reads
//! the actors and the order log; this one is read by them).
//!
//! Cardinality is bounded: routes are a fixed list, outcomes are error codes,
//! and the only open-ended label is `sale_id`, bounded by the number of sales.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric name, without the `flashsale_` prefix the registry adds
/// (and without the `_total` suffix counters get when encoded).
pub mod name {
    pub const PREFIX: &str = "flashsale";
    pub const HTTP_REQUESTS: &str = "http_requests";
    pub const HTTP_REQUEST_DURATION: &str = "http_request_duration_seconds";
    pub const PURCHASES: &str = "purchases";
    pub const ORDER_ACTIONS: &str = "order_actions";
    pub const PAYMENT_REFUNDS: &str = "payment_refunds";
    pub const BATCH_SIZE: &str = "order_log_batch_size";
    pub const CONFIRM_LATENCY: &str = "order_log_confirm_seconds";
    pub const WRITER_BATCH_LATENCY: &str = "order_writer_batch_seconds";
    pub const SALE_STOCK_LEFT: &str = "sale_stock_left";
    pub const SALE_UNITS: &str = "sale_units";
    pub const SALE_MAILBOX_DEPTH: &str = "stock_actor_mailbox_depth";
    pub const SALE_MESSAGES: &str = "stock_actor_messages";
    pub const SNAPSHOT_FAILURES: &str = "redis_snapshot_failures";
    pub const SNAPSHOT_LAG: &str = "redis_snapshot_lag_seconds";
    pub const PUBLISHER_CONNECTED: &str = "order_publisher_connected";
    pub const PUBLISHER_QUEUED: &str = "order_publisher_queued";
    pub const PUBLISHER_UNCONFIRMED: &str = "order_publisher_unconfirmed_batches";
    pub const PUBLISHER_CONFIRMED_ENTRIES: &str = "order_publisher_confirmed_entries";
    pub const PUBLISHER_FAILED_BATCHES: &str = "order_publisher_failed_batches";
    pub const PUBLISHER_IN_DOUBT: &str = "order_publisher_in_doubt";
    pub const PUBLISHER_RELEASED: &str = "order_publisher_released";
    pub const PUBLISHER_RECONNECTS: &str = "order_publisher_connects";
    pub const QUEUE_DEPTH: &str = "order_queue_depth";
    pub const WRITERS_CONNECTED: &str = "order_writers_connected";
    pub const WRITERS_IN_FLIGHT: &str = "order_writers_in_flight";
    pub const WRITER_MESSAGES: &str = "order_writer_messages";
    pub const WRITER_ROWS: &str = "order_writer_rows";
    pub const WRITER_RETRIES: &str = "order_writer_retries";
    pub const DEAD_LETTERS: &str = "order_writer_dead_letters";
    pub const BREAKER_STATE: &str = "circuit_breaker_state";
    pub const BREAKER_FAILURES: &str = "circuit_breaker_failures";
    pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
    pub const PROCESS_FDS: &str = "process_open_fds";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
    pub outcome: &'static str,
}

/// The event metrics, updated where the events happen.
#[derive(Debug)]
pub struct Metrics {
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: Family<RouteLabels, Histogram>,
    pub purchases: Family<OutcomeLabels, Counter>,
    pub order_actions: Family<ActionLabels, Counter>,
    pub refunds: Counter,
    pub batch_size: Histogram,
    pub confirm_latency: Histogram,
    pub writer_batch_latency: Histogram,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    /// Creates the event metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(latency_histogram),
            purchases: Family::default(),
            order_actions: Family::default(),
            refunds: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            confirm_latency: latency_histogram(),
            writer_batch_latency: latency_histogram(),
        };
        registry.register(
            name::HTTP_REQUESTS,
            "HTTP requests by route, method and status",
            m.http_requests.clone(),
        );
        registry.register(
            name::HTTP_REQUEST_DURATION,
            "HTTP request latency by route and method",
            m.http_request_duration.clone(),
        );
        registry.register(
            name::PURCHASES,
            "Purchase attempts by outcome (created, replayed, or the error code)",
            m.purchases.clone(),
        );
        registry.register(
            name::ORDER_ACTIONS,
            "Payments and cancellations by outcome",
            m.order_actions.clone(),
        );
        registry.register(
            name::PAYMENT_REFUNDS,
            "Charges handed back because their payment lost (the reservation expired or was cancelled first)",
            m.refunds.clone(),
        );
        registry.register(
            name::BATCH_SIZE,
            "Entries per order-log message",
            m.batch_size.clone(),
        );
        registry.register(
            name::CONFIRM_LATENCY,
            "Time from publishing a batch to its broker confirm",
            m.confirm_latency.clone(),
        );
        registry.register(
            name::WRITER_BATCH_LATENCY,
            "Time to write one order-log message to PostgreSQL",
            m.writer_batch_latency.clone(),
        );
        Arc::new(m)
    }
}

/// A fixed label for a request path, so the route label stays bounded.
pub fn route_label(path: &str) -> &'static str {
    const EXACT: &[&str] = &[
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/api/v1/users",
        "/api/v1/sessions",
        "/api/v1/sales",
        "/api/v1/orders",
        "/api/v1/payments/webhook",
        "/admin/v1/sales",
        "/admin/v1/actors",
    ];
    if let Some(p) = EXACT.iter().find(|p| **p == path) {
        return p;
    }
    if let Some(rest) = path.strip_prefix("/api/v1/sales/") {
        return if rest.ends_with("/purchases") {
            "/api/v1/sales/{id}/purchases"
        } else {
            "/api/v1/sales/{id}"
        };
    }
    if let Some(rest) = path.strip_prefix("/api/v1/orders/") {
        return if rest.ends_with("/payment") {
            "/api/v1/orders/{id}/payment"
        } else if rest.ends_with("/cancel") {
            "/api/v1/orders/{id}/cancel"
        } else {
            "/api/v1/orders/{id}"
        };
    }
    if let Some(rest) = path.strip_prefix("/admin/v1/sales/") {
        return if rest.ends_with("/pause") {
            "/admin/v1/sales/{id}/pause"
        } else if rest.ends_with("/resume") {
            "/admin/v1/sales/{id}/resume"
        } else {
            "/admin/v1/sales/{id}"
        };
    }
    "unmatched"
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn routes_are_bounded() {
        assert_eq!(route_label("/healthz"), "/healthz");
        assert_eq!(
            route_label("/api/v1/sales/abc/purchases"),
            "/api/v1/sales/{id}/purchases"
        );
        assert_eq!(route_label("/api/v1/sales/abc"), "/api/v1/sales/{id}");
        assert_eq!(
            route_label("/api/v1/orders/x/cancel"),
            "/api/v1/orders/{id}/cancel"
        );
        assert_eq!(
            route_label("/admin/v1/sales/x/pause"),
            "/admin/v1/sales/{id}/pause"
        );
        assert_eq!(route_label("/whatever/12345"), "unmatched");
    }
}
