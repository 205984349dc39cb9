//! Prometheus metrics: every name in [`name`], one [`Registry`] built by
//! `Application::build` and passed in (no global registry).
//!
//! Two kinds. Events on the hot path (HTTP requests, purchase outcomes,
//! batch sizes and latencies) are metric objects updated where they happen.
//! State that the actors, the publisher and the writers already keep in
//! atomics (stock left, mailbox depth, queue depth, rows written, dead
//! letters...) is read at scrape time by [`StateCollector`], so it costs the
//! hot path nothing and can never disagree with `/admin/v1/actors`.
//!
//! Cardinality is bounded: routes are a fixed list, outcomes are error codes,
//! and the only open-ended label is `sale_id`, bounded by the number of sales.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::actors::registry::{SaleHandle, SaleRegistry};
use crate::order_log::sink::OrderPublisher;
use crate::order_log::writer::WriterStats;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabels {
    dependency: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SaleLabels {
    sale_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SaleStatusLabels {
    sale_id: String,
    status: &'static str,
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

/// Reads the live state of the actors and the pipeline at scrape time.
pub struct StateCollector {
    pub sales: Arc<SaleRegistry>,
    pub publisher: OrderPublisher,
    pub writers: Arc<WriterStats>,
    pub breakers: Arc<crate::breaker::Breakers>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One integer gauge family with a series per sale.
fn per_sale(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    sales: &[Arc<SaleHandle>],
    series: impl Fn(&SaleHandle) -> Vec<(SaleLabels, i64)>,
) -> std::fmt::Result {
    let g = ConstGauge::new(0i64);
    let mut fam = e.encode_descriptor(name, help, None, g.metric_type())?;
    for h in sales {
        for (labels, v) in series(h) {
            ConstGauge::new(v).encode(fam.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Resident memory in bytes and open file descriptors, from /proc (Linux).
pub fn process_usage() -> (i64, i64) {
    let rss_pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<i64>().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| to_i64(d.count()));
    (rss_pages * 4096, fds)
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sales = self.sales.all();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let id = |h: &SaleHandle| SaleLabels {
            sale_id: h.shared.sale().id.to_string(),
        };
        per_sale(
            &mut e,
            name::SALE_STOCK_LEFT,
            "Units a sale has left",
            &sales,
            |h| vec![(id(h), i64::from(h.shared.stock_left()))],
        )?;
        per_sale(
            &mut e,
            name::SALE_MAILBOX_DEPTH,
            "Purchases and actions waiting in a stock actor's mailbox",
            &sales,
            |h| vec![(id(h), to_i64(h.shared.mailbox_depth()))],
        )?;
        {
            let g = ConstGauge::new(0i64);
            let mut fam = e.encode_descriptor(
                name::SALE_UNITS,
                "Units of a sale by order status",
                None,
                g.metric_type(),
            )?;
            for h in &sales {
                let sale_id = h.shared.sale().id.to_string();
                let c = h.shared.counters();
                for (status, v) in [
                    ("reserved", c.reserved),
                    ("paid", c.paid),
                    ("expired", c.expired),
                    ("cancelled", c.cancelled),
                ] {
                    let l = SaleStatusLabels {
                        sale_id: sale_id.clone(),
                        status,
                    };
                    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
                        .encode(fam.encode_family(&l)?)?;
                }
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut fam = e.encode_descriptor(
                name::SALE_MESSAGES,
                "Messages a stock actor has handled",
                None,
                c.metric_type(),
            )?;
            for h in &sales {
                ConstCounter::new(h.shared.messages_handled.load(Ordering::Relaxed))
                    .encode(fam.encode_family(&id(h))?)?;
            }
        }
        {
            let g = ConstGauge::new(0.0f64);
            let mut fam = e.encode_descriptor(
                name::SNAPSHOT_LAG,
                "Seconds since a sale's last Redis snapshot, when its state has changed since",
                None,
                g.metric_type(),
            )?;
            for h in &sales {
                let behind = h.shared.snapshot_version.load(Ordering::Relaxed)
                    != h.shared.version.load(Ordering::Relaxed);
                let at = h.shared.snapshot_at_ms.load(Ordering::Relaxed);
                let lag = if behind && at > 0 {
                    (now_ms - at) as f64 / 1000.0
                } else {
                    0.0
                };
                ConstGauge::new(lag).encode(fam.encode_family(&id(h))?)?;
            }
        }
        let snapshot_failures: u64 = sales
            .iter()
            .map(|h| h.shared.snapshot_failures.load(Ordering::Relaxed))
            .sum();
        counter(
            &mut e,
            name::SNAPSHOT_FAILURES,
            "Redis snapshot writes that failed",
            snapshot_failures,
        )?;

        let p = self.publisher.stats();
        gauge(
            &mut e,
            name::PUBLISHER_CONNECTED,
            "1 when the order publisher is connected to RabbitMQ",
            i64::from(self.publisher.is_up()),
        )?;
        gauge(
            &mut e,
            name::PUBLISHER_QUEUED,
            "Entries waiting to be batched",
            to_i64(self.publisher.queued()),
        )?;
        gauge(
            &mut e,
            name::PUBLISHER_UNCONFIRMED,
            "Batches published and not yet confirmed",
            to_i64(p.unconfirmed_batches.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut e,
            name::PUBLISHER_CONFIRMED_ENTRIES,
            "Order-log entries confirmed by RabbitMQ",
            p.entries_confirmed.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            name::PUBLISHER_FAILED_BATCHES,
            "Batches whose publish or confirm failed",
            p.batches_failed.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut e,
            name::PUBLISHER_IN_DOUBT,
            "Entries whose fate is being decided",
            to_i64(p.in_doubt.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut e,
            name::PUBLISHER_RELEASED,
            "Reservations released because they never became durable",
            p.released.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            name::PUBLISHER_RECONNECTS,
            "Connections the publisher has made to RabbitMQ",
            p.reconnects.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut e,
            name::QUEUE_DEPTH,
            "Messages ready in the order queue (sampled every second)",
            i64::from(p.queue_depth.load(Ordering::Relaxed)),
        )?;

        let w = &self.writers;
        gauge(
            &mut e,
            name::WRITERS_CONNECTED,
            "Order writers consuming from RabbitMQ",
            to_i64(w.connected.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut e,
            name::WRITERS_IN_FLIGHT,
            "Deliveries held by writers, not yet acked",
            to_i64(w.in_flight.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut e,
            name::WRITER_MESSAGES,
            "Order-log messages written to PostgreSQL",
            w.messages_written.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            name::WRITER_ROWS,
            "Order rows inserted or moved",
            w.rows_written.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            name::WRITER_RETRIES,
            "Writes retried after a transient failure",
            w.retries.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            name::DEAD_LETTERS,
            "Messages that could never be written, sent to the dead-letter queue",
            w.dead_letters.load(Ordering::Relaxed),
        )?;

        {
            let g = ConstGauge::new(0i64);
            let mut fam = e.encode_descriptor(
                name::BREAKER_STATE,
                "Circuit breaker per dependency: 0 closed, 1 half-open, 2 open",
                None,
                g.metric_type(),
            )?;
            for (dependency, b) in self.breakers.all() {
                ConstGauge::new(b.snapshot().state.level())
                    .encode(fam.encode_family(&DependencyLabels { dependency })?)?;
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut fam = e.encode_descriptor(
                name::BREAKER_FAILURES,
                "Failures seen by each dependency's circuit breaker",
                None,
                c.metric_type(),
            )?;
            for (dependency, b) in self.breakers.all() {
                ConstCounter::new(b.snapshot().total_failures)
                    .encode(fam.encode_family(&DependencyLabels { dependency })?)?;
            }
        }

        let (rss, fds) = process_usage();
        gauge(
            &mut e,
            name::PROCESS_RSS,
            "Resident memory of the server",
            rss,
        )?;
        gauge(
            &mut e,
            name::PROCESS_FDS,
            "Open file descriptors of the server",
            fds,
        )?;
        Ok(())
    }
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
