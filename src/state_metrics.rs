//! The scrape-time collector: what the stock actors, the order log and the
//! breakers keep in atomics, read when `/metrics` is scraped, so it costs
//! the hot path nothing and can never disagree with `/admin/v1/actors`.
//!
//! A module of its own because it reads the actors and the order log, which
//! themselves update the event metrics of [`crate::metrics`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::actors::registry::{SaleHandle, SaleRegistry};
use crate::metrics::name;
use crate::order_log::sink::OrderPublisher;
use crate::order_log::writer::WriterStats;

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
