//! Recovery of the order log in services mode: before any sale opens,
//! every message RabbitMQ holds is written into PostgreSQL; at shutdown,
//! the writers are given the time to empty the queue.
//!
//! (In embedded mode a committed batch is already in the store: there is
//! nothing to drain.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicGetOptions;
use lapin::Channel;

use super::writer::{write_deliveries, WriterConfig, WriterStats};
use crate::persistence::rabbit;

/// How far start-up recovery's drain has come, for `/readyz`.
#[derive(Debug, Default)]
pub struct DrainProgress {
    /// Messages the order queue held when last looked at.
    pub left: AtomicU64,
    /// Messages written (or dead-lettered) so far.
    pub handled: AtomicU64,
}

/// Recovery: pulls every message the queue holds (no consumers yet) and
/// writes it, until the queue is empty, however long that takes: a sale must
/// never open on a partially drained log. Failures of the broker or the
/// database are retried with backoff; past `warn_after` a warning says what
/// is left, and the drain goes on. Returns the messages handled.
pub async fn drain_queue(
    config: &WriterConfig,
    stats: &WriterStats,
    warn_after: Duration,
    progress: &DrainProgress,
) -> u64 {
    let drain = async {
        let mut backoff = Duration::from_millis(config.orders.retry_initial_ms.max(1));
        loop {
            match drain_once(config, stats, progress).await {
                Ok(()) => return progress.handled.load(Ordering::Acquire),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "recovery: cannot drain the order log yet");
                    stats.set_error(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(config.orders.retry_max_ms));
                }
            }
        }
    };
    tokio::pin!(drain);
    tokio::select! {
        handled = &mut drain => return handled,
        _ = tokio::time::sleep(warn_after) => tracing::warn!(
            left = progress.left.load(Ordering::Acquire),
            handled = progress.handled.load(Ordering::Acquire),
            after_secs = warn_after.as_secs(),
            "recovery: the order log is still draining; every sale stays closed until it is done"
        ),
    }
    drain.await
}

/// One connection's worth of draining: `Ok` once the queue is empty.
async fn drain_once(
    config: &WriterConfig,
    stats: &WriterStats,
    progress: &DrainProgress,
) -> Result<(), String> {
    let (conn, channel) = rabbit::open(&config.rabbit, "flashsale-recovery")
        .await
        .map_err(|e| e.to_string())?;
    let queue = config.rabbit.queue.as_str();
    let mut client = None;
    let result = async {
        loop {
            let left = rabbit::queue_depth(&channel, queue).await?;
            progress.left.store(u64::from(left), Ordering::Release);
            let Some(first) = get_one(&channel, queue).await? else {
                return Ok(());
            };
            let mut deliveries = vec![first];
            // Up to a writer's prefetch window per statement, as the consumers do.
            while deliveries.len() < usize::from(config.orders.writer_prefetch.max(1)) {
                match get_one(&channel, queue).await? {
                    Some(d) => deliveries.push(d),
                    None => break,
                }
            }
            let count = deliveries.len() as u64;
            client = write_deliveries(client, config, stats, deliveries).await;
            progress.handled.fetch_add(count, Ordering::AcqRel);
        }
    }
    .await;
    rabbit::close(&conn, "recovery").await;
    result
}

/// One message from `queue` without a consumer, if it holds any.
async fn get_one(channel: &Channel, queue: &str) -> Result<Option<Delivery>, String> {
    let get = channel.basic_get(queue.into(), BasicGetOptions::default());
    let got = tokio::time::timeout(rabbit::CALL_TIMEOUT, get)
        .await
        .map_err(|_| "RabbitMQ did not answer a get in time".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(got.map(|m| m.delivery))
}

/// Waits until the order queue is empty and no writer holds a delivery, seen
/// twice in a row a little apart (a delivery can sit between the broker and
/// a writer for a moment). False if that did not happen within `timeout`.
pub async fn wait_drained(
    channel: &Channel,
    queue: &str,
    stats: &WriterStats,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_rounds = 0;
    while tokio::time::Instant::now() < deadline {
        let depth = rabbit::queue_depth(channel, queue).await;
        let idle = stats.in_flight.load(Ordering::Acquire) == 0;
        if matches!(depth, Ok(0)) && idle {
            quiet_rounds += 1;
            if quiet_rounds >= 2 {
                return true;
            }
        } else {
            quiet_rounds = 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
