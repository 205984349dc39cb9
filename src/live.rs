//! Live state for event streams, pushed from the stock actors.
//!
//! Each stock actor serialises its sale's public view once per change (at
//! most every `events.publish_interval_ms`) and replaces the latest value of
//! a watch channel ([`SaleFeed`]). Every stream of that sale reads the latest
//! value when it is woken, so any number of streams cost one serialisation
//! per change, and a slow client skips states instead of buffering them.
//! [`Catalogue`] counts changes of any sale, for streams of every sale.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::watch;

use crate::domain::sale::{SaleStatus, SaleView};

/// One published state of a sale.
#[derive(Debug)]
pub struct SaleFrame {
    /// Increases with every frame of the sale: the event's `id`.
    pub id: u64,
    /// The status the view was made with (it also moves with the clock).
    pub status: SaleStatus,
    /// The book version the view was made from.
    pub version: u64,
    /// The [`SaleView`] as a JSON object.
    pub json: Box<str>,
    /// The whole server-sent event (`id`, `event: sale`, the view with the
    /// time it was published as `server_time`), rendered once: every stream
    /// sends these same bytes, a reference count each.
    pub event: Bytes,
}

impl SaleFrame {
    fn new(id: u64, view: &SaleView, version: u64) -> Self {
        let mut frame = SaleFrame {
            id,
            status: view.status,
            version,
            json: serde_json::to_string(view)
                .unwrap_or_else(|_| "{}".to_owned())
                .into_boxed_str(),
            event: Bytes::new(),
        };
        frame.event = Bytes::from(frame.event_at(id, Utc::now()));
        frame
    }

    /// The server-sent event `sale` with id `id`, the view as of `now`.
    pub fn event_at(&self, id: u64, now: DateTime<Utc>) -> String {
        format!("id: {id}\nevent: sale\ndata: {}\n\n", self.with_time(now))
    }

    /// The view with the server's clock first (`{"server_time":..,<view>}`),
    /// as `GET /api/v1/sales/{id}` answers it; no second serialisation.
    pub fn with_time(&self, now: DateTime<Utc>) -> String {
        let rest = self.json.strip_prefix('{').unwrap_or("}");
        let sep = if rest.starts_with('}') { "" } else { "," };
        format!(
            "{{\"server_time\":\"{}\"{sep}{rest}",
            now.to_rfc3339_opts(SecondsFormat::Micros, true)
        )
    }
}

/// Counts changes of any sale (and new sales): streams of every sale wait on it.
#[derive(Debug)]
pub struct Catalogue {
    tx: watch::Sender<u64>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Catalogue {
            tx: watch::Sender::new(0),
        }
    }
}

impl Catalogue {
    pub fn bump(&self) {
        self.tx.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    pub fn generation(&self) -> u64 {
        *self.tx.borrow()
    }
}

/// The latest published state of one sale, and its status alone (streams
/// that space out stock changes still pass a new status on at once).
#[derive(Debug)]
pub struct SaleFeed {
    tx: watch::Sender<Arc<SaleFrame>>,
    status: watch::Sender<SaleStatus>,
    catalogue: Arc<Catalogue>,
}

impl SaleFeed {
    pub fn new(view: &SaleView, version: u64, catalogue: Arc<Catalogue>) -> Self {
        // A new sale is announced by the registry once it can be found
        // there (`SaleRegistry::insert`), not here.
        SaleFeed {
            tx: watch::Sender::new(Arc::new(SaleFrame::new(1, view, version))),
            status: watch::Sender::new(view.status),
            catalogue,
        }
    }

    pub fn latest(&self) -> Arc<SaleFrame> {
        self.tx.borrow().clone()
    }

    /// Publishes `view` unless the latest frame already shows this version
    /// in this status. Returns whether it published.
    pub fn publish_if_changed(
        &self,
        view: impl FnOnce() -> SaleView,
        status: SaleStatus,
        version: u64,
    ) -> bool {
        let latest = self.latest();
        if latest.version == version && latest.status == status {
            return false;
        }
        let frame = SaleFrame::new(latest.id + 1, &view(), version);
        self.tx.send_replace(Arc::new(frame));
        if latest.status != status {
            self.status.send_replace(status);
        }
        self.catalogue.bump();
        true
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<SaleFrame>> {
        self.tx.subscribe()
    }

    /// Changes of status only (live, sold out, paused, ended...).
    pub fn subscribe_status(&self) -> watch::Receiver<SaleStatus> {
        self.status.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, SubsecRound};
    use uuid::Uuid;

    use super::*;

    fn view(stock_left: i64, status: SaleStatus) -> SaleView {
        let now = Utc::now();
        SaleView {
            id: Uuid::nil(),
            name: "n".into(),
            description: String::new(),
            price_cents: 1,
            currency: "EUR".into(),
            stock_total: 5,
            stock_left,
            per_user_limit: 1,
            starts_at: now,
            ends_at: now + Duration::hours(1),
            reservation_ttl_secs: 60,
            status,
        }
    }

    #[test]
    fn a_feed_publishes_changes_once_and_streams_see_only_the_latest() {
        let catalogue = Arc::new(Catalogue::default());
        let feed = SaleFeed::new(&view(5, SaleStatus::Live), 0, catalogue.clone());
        let mut rx = feed.subscribe();
        let generation = catalogue.generation();
        assert!(!feed.publish_if_changed(|| view(5, SaleStatus::Live), SaleStatus::Live, 0));
        assert!(feed.publish_if_changed(|| view(4, SaleStatus::Live), SaleStatus::Live, 1));
        assert!(feed.publish_if_changed(|| view(0, SaleStatus::SoldOut), SaleStatus::SoldOut, 2));
        assert_eq!(catalogue.generation(), generation + 2);
        // A reader that was slow sees the last state only.
        assert!(rx.has_changed().unwrap_or(false));
        let latest = rx.borrow_and_update().clone();
        assert_eq!((latest.id, latest.status), (3, SaleStatus::SoldOut));
        assert!(!rx.has_changed().unwrap_or(true));
        // Status moves with the clock too: same version, new frame.
        let mut status = feed.subscribe_status();
        assert!(feed.publish_if_changed(|| view(0, SaleStatus::Ended), SaleStatus::Ended, 2));
        assert_eq!(*status.borrow_and_update(), SaleStatus::Ended);
        // A stock change alone leaves the status channel quiet.
        assert!(feed.publish_if_changed(|| view(1, SaleStatus::Ended), SaleStatus::Ended, 3));
        assert!(!status.has_changed().unwrap_or(true));
        assert!(feed
            .latest()
            .event
            .starts_with(b"id: 5\nevent: sale\ndata: {\"server_time\":"));
    }

    #[test]
    fn the_server_time_goes_first_in_the_same_object() {
        let catalogue = Arc::new(Catalogue::default());
        let feed = SaleFeed::new(&view(5, SaleStatus::Live), 0, catalogue);
        let now = Utc::now();
        let text = feed.latest().with_time(now);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(parsed["stock_left"], 5);
        assert_eq!(parsed["status"], "live");
        let at: DateTime<Utc> = serde_json::from_value(parsed["server_time"].clone())
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(at, now.trunc_subsecs(6));
    }
}
