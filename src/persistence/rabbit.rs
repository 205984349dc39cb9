//! RabbitMQ: the durable order log between the stock actors and PostgreSQL.
//!
//! This module owns connecting and the topology: the durable order queue, a
//! dead-letter exchange and the dead-letter queue it routes to. The server
//! declares them at start (declarations are idempotent), so a fresh broker
//! needs no set-up by hand.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;

use super::{redact_url, Unreachable};
use crate::config::RabbitSettings;

/// Opens a connection, bounded by the configured time-out.
pub async fn connect(settings: &RabbitSettings, name: &str) -> Result<Connection, Unreachable> {
    let url = settings.url.expose_secret();
    let unreachable = |e: &dyn std::fmt::Display| {
        Unreachable::new("RabbitMQ", redact_url(url), "rabbitmq.url", e)
    };
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    match tokio::time::timeout(timeout, Connection::connect(url, properties)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable(&e)),
        Err(_) => Err(unreachable(&format!(
            "no answer within {} ms",
            settings.connect_timeout_ms
        ))),
    }
}

/// Connects and opens a channel on which the topology is declared: what every
/// user of the broker (start-up check, publisher, writers, recovery) starts
/// with. The whole of it is bounded by `rabbitmq.connect_timeout_ms`.
pub async fn open(
    settings: &RabbitSettings,
    name: &str,
) -> Result<(Connection, Channel), Unreachable> {
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    match tokio::time::timeout(timeout, open_unbounded(settings, name)).await {
        Ok(opened) => opened,
        Err(_) => Err(Unreachable::new(
            "RabbitMQ",
            redact_url(settings.url.expose_secret()),
            "rabbitmq.url",
            format!("no answer within {} ms", settings.connect_timeout_ms),
        )),
    }
}

async fn open_unbounded(
    settings: &RabbitSettings,
    name: &str,
) -> Result<(Connection, Channel), Unreachable> {
    let conn = connect(settings, name).await?;
    let unreachable = |e: lapin::Error| {
        Unreachable::new(
            "RabbitMQ",
            redact_url(settings.url.expose_secret()),
            "rabbitmq.url",
            e,
        )
    };
    let channel = conn.create_channel().await.map_err(unreachable)?;
    declare_topology(&channel, settings)
        .await
        .map_err(unreachable)?;
    Ok((conn, channel))
}

/// Declares the order queue, its dead-letter exchange and the dead-letter
/// queue. Safe to call any number of times with the same settings.
pub async fn declare_topology(channel: &Channel, settings: &RabbitSettings) -> lapin::Result<()> {
    let dlx = settings.dead_letter_queue.as_str();
    channel
        .exchange_declare(
            dlx.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            dlx.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            dlx.into(),
            dlx.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.to_owned())),
    );
    channel
        .queue_declare(
            settings.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await?;
    Ok(())
}

/// How long a single call to the broker on an open channel may take (a
/// queue-depth probe, an ack): a broker that stops answering is a broken
/// link, never a wait without end.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Closes a connection, waiting for the broker's answer at most
/// [`CALL_TIMEOUT`] (a stalled broker never answers; the socket is dropped
/// with the connection anyway).
pub async fn close(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CALL_TIMEOUT, conn.close(200, reason.into())).await;
}

/// Messages ready in a queue (not counting those delivered and not yet
/// acked), within [`CALL_TIMEOUT`].
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, String> {
    let declared = channel.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable().passive(),
        FieldTable::default(),
    );
    match tokio::time::timeout(CALL_TIMEOUT, declared).await {
        Ok(Ok(q)) => Ok(q.message_count()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "RabbitMQ did not answer within {} ms",
            CALL_TIMEOUT.as_millis()
        )),
    }
}
