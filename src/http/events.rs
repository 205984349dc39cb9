//! Server-sent event streams: one sale, every sale, and the admin status.
//!
//! Sale streams read the latest frame each stock actor published
//! ([`crate::live`]): woken by a watch channel, they send what is there now,
//! so a slow client skips states and no stream holds a growing buffer. A
//! comment every `events.keepalive_secs` keeps idle streams open through
//! proxies. Open streams are bounded in all and per client address.
//!
//! `EventSource` cannot send an `Authorization` header, so the admin stream
//! opens with a short-lived ticket signed by this process
//! (`POST /admin/v1/events/tickets`, with the admin token), never the admin
//! token in a URL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::watch;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::sales::sale_id;
use super::{AppState, ClientIp};
use crate::config::EventSettings;
use crate::live::SaleFrame;

/// Open streams, in all and per client address.
pub struct StreamSlots {
    open: AtomicUsize,
    per_ip: DashMap<IpAddr, u32>,
    max: usize,
    max_per_ip: u32,
}

/// One open stream's place; given back when the stream is dropped (the
/// client went away or the server stops).
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    ip: Option<IpAddr>,
}

impl StreamSlots {
    pub fn new(settings: &EventSettings) -> Arc<Self> {
        Arc::new(StreamSlots {
            open: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            max: settings.max_streams,
            max_per_ip: settings.max_streams_per_ip,
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn take(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        retry_after_secs: u32,
    ) -> Result<StreamSlot, ApiError> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::Overloaded { retry_after_secs });
        }
        let ip = ip.filter(|_| self.max_per_ip > 0);
        if let Some(ip) = ip {
            let mut held = self.per_ip.entry(ip).or_insert(0);
            if *held >= self.max_per_ip {
                drop(held);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(ApiError::RateLimited { retry_after_secs });
            }
            *held += 1;
        }
        Ok(StreamSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            if let Some(mut held) = self.slots.per_ip.get_mut(&ip) {
                *held = held.saturating_sub(1);
            }
            self.slots.per_ip.remove_if(&ip, |_, held| *held == 0);
        }
    }
}

/// Signs and checks admin stream tickets with a key of this process.
pub struct TicketKey([u8; 32]);

impl TicketKey {
    pub fn random() -> Self {
        TicketKey(rand::random())
    }

    fn mac(&self, expires: i64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(b"admin-events.");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// `"<expiry unix seconds>.<hex HMAC>"`.
    pub fn issue(&self, expires: DateTime<Utc>) -> String {
        let at = expires.timestamp();
        format!("{at}.{}", hex::encode(self.mac(at).finalize().into_bytes()))
    }

    pub fn verify(&self, ticket: &str, now: DateTime<Utc>) -> bool {
        let Some((at, sig)) = ticket.split_once('.') else {
            return false;
        };
        let (Ok(at), Ok(sig)) = (at.parse::<i64>(), hex::decode(sig)) else {
            return false;
        };
        at >= now.timestamp() && self.mac(at).verify_slice(&sig).is_ok()
    }
}

const KEEPALIVE: &[u8] = b": keepalive\n\n";
/// Asks EventSource to come back after 2 s when a stream breaks.
const RETRY: &str = "retry: 2000\n";

fn sse(
    stream: impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + 'static,
) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(stream)
}

fn last_event_id(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn slot(state: &AppState, req: &HttpRequest) -> Result<StreamSlot, ApiError> {
    let ip = req.extensions().get::<ClientIp>().map(|c| c.0);
    state.streams.take(ip, state.retry_after_secs)
}

/// Waits for `rx` to change or for the keep-alive deadline: `None` when the
/// sender is gone, `Some(false)` on keep-alive (the deadline moves on).
async fn next_change<T>(
    rx: &mut watch::Receiver<T>,
    keepalive_at: &mut tokio::time::Instant,
    state: &AppState,
) -> Option<bool> {
    tokio::select! {
        changed = rx.changed() => changed.ok().map(|()| true),
        () = tokio::time::sleep_until(*keepalive_at) => {
            *keepalive_at = tokio::time::Instant::now() + state.events.keepalive;
            Some(false)
        }
    }
}

/// How long a stream waits after an event before it looks again: the
/// sale's publish interval, or longer when so many streams are open that
/// `events.max_deliveries_per_sec` would be passed (changes in between
/// coalesce, so each stream still gets the latest state).
fn gap(state: &AppState) -> Duration {
    let timings = &state.events;
    let spread = Duration::from_secs_f64(
        state.streams.open() as f64 / timings.max_deliveries_per_sec.max(1) as f64,
    );
    spread.max(timings.publish_interval)
}

struct SaleStream {
    state: web::Data<AppState>,
    rx: watch::Receiver<Arc<SaleFrame>>,
    /// Wakes a stream waiting out its gap when the status changes.
    status_rx: watch::Receiver<crate::domain::sale::SaleStatus>,
    /// What goes out before waiting: the retry hint and the current state.
    first: Option<Bytes>,
    keepalive_at: tokio::time::Instant,
    /// Whether the last thing sent was an event (then the gap is kept).
    sent_event: bool,
    _slot: StreamSlot,
}

#[utoipa::path(get, path = "/api/v1/sales/{id}/events", tag = "shoppers",
    params(("id" = String, Path, description = "sale id"),
        ("Last-Event-ID" = Option<String>, Header, description = "the last event id seen; the current state is sent only if it is newer")),
    responses((status = 200, description = "text/event-stream: `sale` events, each the sale as GET /api/v1/sales/{id} returns it (with server_time), first the current state, then on every change of stock, status or window, at most 10 per second; a comment every 15 s", content_type = "text/event-stream", body = String),
        (status = 404, description = "sale_not_found", body = Problem),
        (status = 429, description = "rate_limited: too many open streams from this address", body = Problem),
        (status = 503, description = "overloaded: too many open streams", body = Problem)))]
pub async fn sale_events(
    state: &web::Data<AppState>,
    raw_id: &str,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let handle = state
        .registry
        .get(sale_id(raw_id)?)
        .ok_or(ApiError::SaleNotFound)?;
    let slot = slot(state, req)?;
    let mut rx = handle.shared.feed.subscribe();
    let mut status_rx = handle.shared.feed.subscribe_status();
    status_rx.borrow_and_update();
    let frame = rx.borrow_and_update().clone();
    let mut first = RETRY.to_owned();
    if last_event_id(req) != Some(frame.id) {
        first.push_str(&frame.event_at(frame.id, Utc::now()));
    }
    let stream = SaleStream {
        state: state.clone(),
        rx,
        status_rx,
        first: Some(Bytes::from(first)),
        keepalive_at: tokio::time::Instant::now() + state.events.keepalive,
        sent_event: false,
        _slot: slot,
    };
    Ok(sse(futures_util::stream::unfold(
        stream,
        |mut st| async move {
            if let Some(first) = st.first.take() {
                return Some((Ok(first), st));
            }
            if st.sent_event {
                // Stock changes wait out the gap; a new status (sold out,
                // paused...) goes at once.
                tokio::select! {
                    () = tokio::time::sleep(gap(&st.state)) => {}
                    changed = st.status_rx.changed() => changed.ok()?,
                }
            }
            let changed = next_change(&mut st.rx, &mut st.keepalive_at, &st.state).await?;
            st.sent_event = changed;
            let bytes = if changed {
                // The frame's own bytes: rendered once for every stream.
                st.rx.borrow_and_update().event.clone()
            } else {
                Bytes::from_static(KEEPALIVE)
            };
            Some((Ok(bytes), st))
        },
    )))
}

struct CatalogueStream {
    state: web::Data<AppState>,
    rx: watch::Receiver<u64>,
    /// The frame id last sent of each sale.
    sent: HashMap<Uuid, u64>,
    pending: Option<Bytes>,
    keepalive_at: tokio::time::Instant,
    _slot: StreamSlot,
}

impl CatalogueStream {
    /// Every sale whose frame is newer than what this stream sent, as events.
    fn news(&mut self) -> Option<Bytes> {
        let generation = *self.rx.borrow_and_update();
        let now = Utc::now();
        let mut out = String::new();
        for handle in self.state.registry.all() {
            let frame = handle.shared.feed.latest();
            let id = handle.shared.sale().id;
            if self.sent.get(&id) == Some(&frame.id) {
                continue;
            }
            self.sent.insert(id, frame.id);
            out.push_str(&frame.event_at(generation, now));
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }
}

#[utoipa::path(get, path = "/api/v1/sales/events", tag = "shoppers",
    params(("Last-Event-ID" = Option<String>, Header, description = "the last event id seen; the sales are sent again only if something changed since")),
    responses((status = 200, description = "text/event-stream: a `sale` event per sale (as GET /api/v1/sales/{id} returns it, with server_time), then one per sale that changes, at most 10 per second per sale; a comment every 15 s", content_type = "text/event-stream", body = String),
        (status = 429, description = "rate_limited: too many open streams from this address", body = Problem),
        (status = 503, description = "overloaded: too many open streams", body = Problem)))]
pub async fn all_sales_events(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let slot = slot(&state, &req)?;
    let rx = state.registry.catalogue.subscribe();
    let unchanged = last_event_id(&req) == Some(*rx.borrow());
    let keepalive_at = tokio::time::Instant::now() + state.events.keepalive;
    let mut stream = CatalogueStream {
        state,
        rx,
        sent: HashMap::new(),
        pending: None,
        keepalive_at,
        _slot: slot,
    };
    if unchanged {
        // The client has every sale as it is now: remember them as sent.
        for handle in stream.state.registry.all() {
            stream
                .sent
                .insert(handle.shared.sale().id, handle.shared.feed.latest().id);
        }
    }
    let mut first = RETRY.as_bytes().to_vec();
    if let Some(news) = stream.news() {
        first.extend_from_slice(&news);
    }
    stream.pending = Some(Bytes::from(first));
    Ok(sse(futures_util::stream::unfold(
        stream,
        |mut st| async move {
            if let Some(first) = st.pending.take() {
                return Some((Ok(first), st));
            }
            loop {
                // Changes of many sales in a burst go out together.
                tokio::time::sleep(gap(&st.state)).await;
                let changed = next_change(&mut st.rx, &mut st.keepalive_at, &st.state).await?;
                if !changed {
                    return Some((Ok(Bytes::from_static(KEEPALIVE)), st));
                }
                if let Some(news) = st.news() {
                    return Some((Ok(news), st));
                }
            }
        },
    )))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventTicket {
    /// Opens `GET /admin/v1/events?ticket=...` until `expires_at`.
    pub ticket: String,
    pub expires_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/admin/v1/events/tickets", tag = "admins", security(("admin_token" = [])),
    responses((status = 201, body = EventTicket),
        (status = 401, description = "unauthenticated", body = Problem)))]
pub async fn ticket(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let expires_at = Utc::now() + state.events.ticket_ttl;
    Ok(HttpResponse::Created()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(EventTicket {
            ticket: state.event_tickets.issue(expires_at),
            expires_at,
        }))
}

#[derive(Debug, Deserialize)]
pub struct TicketQuery {
    ticket: Option<String>,
}

struct AdminStream {
    state: web::Data<AppState>,
    every: Duration,
    sent: u64,
    _slot: StreamSlot,
}

#[utoipa::path(get, path = "/admin/v1/events", tag = "admins",
    params(("ticket" = String, Query, description = "from POST /admin/v1/events/tickets")),
    responses((status = 200, description = "text/event-stream: an `actors` event every second, what GET /admin/v1/actors returns", content_type = "text/event-stream", body = String),
        (status = 401, description = "unauthenticated: no ticket, or a bad or expired one", body = Problem),
        (status = 429, description = "rate_limited: too many open streams from this address", body = Problem),
        (status = 503, description = "overloaded: too many open streams", body = Problem)))]
pub async fn admin_events(
    state: web::Data<AppState>,
    query: web::Query<TicketQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let valid = query
        .ticket
        .as_deref()
        .is_some_and(|t| state.event_tickets.verify(t, Utc::now()));
    if !valid {
        return Err(ApiError::Unauthenticated);
    }
    let slot = slot(&state, &req)?;
    let every = state.events.admin_interval;
    let stream = AdminStream {
        state,
        every,
        sent: 0,
        _slot: slot,
    };
    Ok(sse(futures_util::stream::unfold(
        stream,
        |mut st| async move {
            if st.sent > 0 {
                tokio::time::sleep(st.every).await;
            }
            st.sent += 1;
            let status = super::admin::actors_status(&st.state);
            let data = serde_json::to_string(&status).unwrap_or_else(|_| "{}".to_owned());
            let mut bytes = if st.sent == 1 {
                RETRY.to_owned()
            } else {
                String::new()
            };
            bytes.push_str(&format!("id: {}\nevent: actors\ndata: {data}\n\n", st.sent));
            Some((Ok(Bytes::from(bytes)), st))
        },
    )))
}

/// The stream settings handlers use.
pub struct EventTimings {
    pub keepalive: Duration,
    /// Events all streams may be sent per second before they are spaced out.
    pub max_deliveries_per_sec: u64,
    pub publish_interval: Duration,
    pub admin_interval: Duration,
    pub ticket_ttl: chrono::Duration,
}

impl EventTimings {
    pub fn new(s: &EventSettings) -> Self {
        EventTimings {
            keepalive: Duration::from_secs(s.keepalive_secs.max(1)),
            max_deliveries_per_sec: s.max_deliveries_per_sec,
            publish_interval: Duration::from_millis(s.publish_interval_ms.max(10)),
            admin_interval: Duration::from_millis(s.admin_interval_ms.max(100)),
            ticket_ttl: chrono::Duration::seconds(i64::try_from(s.ticket_ttl_secs).unwrap_or(60)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_open_until_they_expire_and_cannot_be_forged() {
        let key = TicketKey::random();
        let now = Utc::now();
        let t = key.issue(now + chrono::Duration::seconds(60));
        assert!(key.verify(&t, now));
        assert!(!key.verify(&t, now + chrono::Duration::seconds(61)));
        assert!(!TicketKey::random().verify(&t, now));
        let (at, sig) = t.split_once('.').unwrap_or_default();
        let later = format!("{}.{sig}", at.parse::<i64>().unwrap_or(0) + 3600);
        assert!(!key.verify(&later, now));
        assert!(!key.verify("nonsense", now));
        assert!(!key.verify("", now));
    }

    #[test]
    fn stream_slots_are_bounded_in_all_and_per_address() {
        let slots = StreamSlots::new(&EventSettings {
            publish_interval_ms: 100,
            keepalive_secs: 15,
            max_streams: 3,
            max_streams_per_ip: 2,
            max_deliveries_per_sec: 20_000,
            admin_interval_ms: 1000,
            ticket_ttl_secs: 60,
        });
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let one = slots.take(Some(a), 1);
        let two = slots.take(Some(a), 1);
        assert!(one.is_ok() && two.is_ok());
        assert!(matches!(
            slots.take(Some(a), 1),
            Err(ApiError::RateLimited { .. })
        ));
        let three = slots.take(Some(b), 1);
        assert!(three.is_ok());
        assert!(matches!(
            slots.take(Some(b), 1),
            Err(ApiError::Overloaded { .. })
        ));
        drop(one);
        assert_eq!(slots.open(), 2);
        assert!(slots.take(Some(a), 1).is_ok(), "a place came back");
        drop((two, three));
        assert_eq!(slots.open(), 0);
        assert!(
            slots.per_ip.is_empty(),
            "no address is kept once its streams close"
        );
    }
}
