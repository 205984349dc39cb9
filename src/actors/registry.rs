//! `SaleRegistry`: sale id → stock actor, plus what handlers may read
//! without asking the actor.
//!
//! Each sale's [`SaleShared`] is written only by its stock actor and read by
//! any HTTP worker: the sale definition, stock left and counters as atomics.
//! The common "no" answers (not started, ended, paused, sold out) are decided
//! from these hints, so a crowd hammering a sold-out sale never reaches the
//! actor's mailbox. The actor stays the authority: a hint can only be stale
//! towards "ask the actor", never towards a wrong "yes".
//!
//! [`OrderDirectory`] holds the orders this process has made durable, so an
//! order is visible to its owner the moment its 201 is sent, before the
//! order writers have put it in PostgreSQL.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use actix::Addr;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use uuid::Uuid;

use super::stock::StockActor;
use crate::domain::order::{Order, OrderStatus};
use crate::domain::sale::{Sale, SaleView};
use crate::domain::sale_book::{BookCounters, Rejection, SaleBook};
use crate::live::{Catalogue, SaleFeed};

/// A sale's live state as its stock actor last published it.
#[derive(Debug)]
pub struct SaleShared {
    sale: RwLock<Arc<Sale>>,
    starts_at_ms: AtomicI64,
    ends_at_ms: AtomicI64,
    paused: AtomicBool,
    stock_left: AtomicU32,
    reserved: AtomicU64,
    paid: AtomicU64,
    expired: AtomicU64,
    cancelled: AtomicU64,
    pub version: AtomicU64,
    /// Purchases sent to the actor and not yet handled. actix's own mailbox
    /// bound does not hold for `try_send` from fresh senders, so this is the
    /// bound (`stock.mailbox_capacity`) and the mailbox-depth gauge.
    mailbox_depth: AtomicUsize,
    mailbox_capacity: usize,
    /// Messages the actor has handled (for admin status).
    pub messages_handled: AtomicU64,
    /// Orders the book keeps whole (for admin status).
    pub orders_in_play: AtomicUsize,
    /// The public view as last published, for event streams.
    pub feed: SaleFeed,
    /// Redis snapshot bookkeeping.
    pub snapshot_failures: AtomicU64,
    pub snapshot_version: AtomicU64,
    pub snapshot_at_ms: AtomicI64,
}

impl SaleShared {
    pub fn new(book: &SaleBook, mailbox_capacity: usize, catalogue: Arc<Catalogue>) -> Self {
        let now = Utc::now();
        let view = SaleView::new(book.sale(), i64::from(book.stock_left()), now);
        let shared = SaleShared {
            sale: RwLock::new(Arc::new(book.sale().clone())),
            starts_at_ms: AtomicI64::new(0),
            ends_at_ms: AtomicI64::new(0),
            paused: AtomicBool::new(false),
            stock_left: AtomicU32::new(0),
            reserved: AtomicU64::new(0),
            paid: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            version: AtomicU64::new(0),
            mailbox_depth: AtomicUsize::new(0),
            mailbox_capacity,
            messages_handled: AtomicU64::new(0),
            orders_in_play: AtomicUsize::new(0),
            feed: SaleFeed::new(&view, book.version(), catalogue),
            snapshot_failures: AtomicU64::new(0),
            snapshot_version: AtomicU64::new(0),
            snapshot_at_ms: AtomicI64::new(0),
        };
        shared.publish_sale(book.sale());
        shared.publish_stock(book);
        shared
    }

    /// Called by the actor after the sale's definition changed.
    pub fn publish_sale(&self, sale: &Sale) {
        self.starts_at_ms
            .store(sale.spec.starts_at.timestamp_millis(), Ordering::Release);
        self.ends_at_ms
            .store(sale.spec.ends_at.timestamp_millis(), Ordering::Release);
        self.paused.store(sale.paused, Ordering::Release);
        if let Ok(mut g) = self.sale.write() {
            *g = Arc::new(sale.clone());
        }
    }

    /// Called by the actor after any change to stock or orders.
    pub fn publish_stock(&self, book: &SaleBook) {
        let c = book.counters();
        self.stock_left.store(book.stock_left(), Ordering::Release);
        self.reserved.store(c.reserved, Ordering::Relaxed);
        self.paid.store(c.paid, Ordering::Relaxed);
        self.expired.store(c.expired, Ordering::Relaxed);
        self.cancelled.store(c.cancelled, Ordering::Relaxed);
        self.orders_in_play
            .store(book.orders_in_play(), Ordering::Relaxed);
        self.version.store(book.version(), Ordering::Release);
    }

    pub fn sale(&self) -> Arc<Sale> {
        match self.sale.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Takes a mailbox slot for a purchase; false when the mailbox is full.
    pub fn admit(&self) -> bool {
        let before = self.mailbox_depth.fetch_add(1, Ordering::AcqRel);
        if before >= self.mailbox_capacity {
            self.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives a mailbox slot back: the actor took the purchase (or it was never sent).
    pub fn leave(&self) {
        self.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn mailbox_depth(&self) -> usize {
        self.mailbox_depth.load(Ordering::Relaxed)
    }

    pub fn stock_left(&self) -> u32 {
        self.stock_left.load(Ordering::Acquire)
    }

    pub fn counters(&self) -> BookCounters {
        BookCounters {
            reserved: self.reserved.load(Ordering::Relaxed),
            paid: self.paid.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
        }
    }

    /// A "no" that needs no actor, if the hints already say so. The caller
    /// does not ask for a purchase whose idempotency key names an order the
    /// buyer already has: that is answered whatever the sale's state is now.
    pub fn quick_rejection(&self, now: DateTime<Utc>) -> Option<Rejection> {
        let now_ms = now.timestamp_millis();
        if now_ms < self.starts_at_ms.load(Ordering::Acquire) {
            Some(Rejection::NotStarted)
        } else if now_ms >= self.ends_at_ms.load(Ordering::Acquire) {
            Some(Rejection::Ended)
        } else if self.paused.load(Ordering::Acquire) {
            Some(Rejection::Paused)
        } else if self.stock_left.load(Ordering::Acquire) == 0 {
            Some(Rejection::SoldOut { left: 0 })
        } else {
            None
        }
    }
}

/// A sale: its shared state and, while it runs, its stock actor. An actor
/// whose sale ended long enough ago with nothing left in play stops
/// (`stock.idle_stop_after_secs`) and is started again on demand
/// (`StockActor::running`); its hints stay here meanwhile, so reads and the
/// hot "no" never need it.
pub struct SaleHandle {
    addr: RwLock<Option<Addr<StockActor>>>,
    pub shared: Arc<SaleShared>,
    /// Held while a stopped actor is being started again, so that one start
    /// serves every request that asked for it.
    pub(super) waking: tokio::sync::Mutex<()>,
}

/// Why a message was not handed to a stock actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRefused {
    /// `stock.mailbox_capacity` messages wait already.
    MailboxFull,
    /// The actor has stopped.
    Stopped,
}

impl SaleHandle {
    pub fn new(addr: Addr<StockActor>, shared: Arc<SaleShared>) -> Self {
        SaleHandle {
            addr: RwLock::new(Some(addr)),
            shared,
            waking: tokio::sync::Mutex::new(()),
        }
    }

    fn slot(&self) -> std::sync::RwLockReadGuard<'_, Option<Addr<StockActor>>> {
        self.addr
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn slot_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<Addr<StockActor>>> {
        self.addr
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The actor's address while it runs.
    pub fn addr(&self) -> Option<Addr<StockActor>> {
        self.slot().clone()
    }

    /// Checked on every purchase: no address is cloned for it.
    pub fn is_running(&self) -> bool {
        self.slot().as_ref().is_some_and(Addr::connected)
    }

    /// Hands a purchase or an order action to the actor within the mailbox
    /// bound, never waiting: a full mailbox is an answer, not a queue.
    pub fn send_bounded<M>(&self, msg: M) -> Result<(), SendRefused>
    where
        M: actix::Message<Result = ()> + Send + 'static,
        StockActor: actix::Handler<M>,
    {
        if !self.shared.admit() {
            return Err(SendRefused::MailboxFull);
        }
        self.send_admitted(msg).map_err(|(refused, _)| {
            self.shared.leave();
            refused
        })
    }

    /// A handle whose actor is gone (for tests of what its senders do).
    #[cfg(test)]
    pub(crate) fn detached(shared: Arc<SaleShared>) -> Self {
        SaleHandle {
            addr: RwLock::new(None),
            shared,
            waking: Default::default(),
        }
    }

    /// Hands `msg`, whose purchases each took their mailbox slot already
    /// (`SaleShared::admit`), to the actor; the message comes back when it
    /// could not be handed over, with the reason. The slot is taken before
    /// the address is read: an idle actor detaches only while no message
    /// holds a slot (`detach_if_idle`).
    pub fn send_admitted<M>(&self, msg: M) -> Result<(), (SendRefused, M)>
    where
        M: actix::Message<Result = ()> + Send + 'static,
        StockActor: actix::Handler<M>,
    {
        let guard = self.slot();
        let Some(addr) = guard.as_ref() else {
            return Err((SendRefused::Stopped, msg));
        };
        // A sender of its own for this one message: a shared one would be
        // parked by actix whenever the mailbox (which also holds `Settled`
        // messages) reached its capacity, refusing purchases the bound
        // admitted. Cloning here, not in `SaleRegistry::get`, keeps the
        // answers that never reach the actor free of it.
        addr.clone().try_send(msg).map_err(|e| match e {
            actix::prelude::SendError::Full(m) => (SendRefused::MailboxFull, m),
            actix::prelude::SendError::Closed(m) => (SendRefused::Stopped, m),
        })
    }

    /// The actor, about to stop, lets go of its address unless a purchase or
    /// an action is waiting in its mailbox. True when it let go.
    pub(super) fn detach_if_idle(&self) -> bool {
        let mut guard = self.slot_mut();
        if self.shared.mailbox_depth() > 0 {
            return false;
        }
        *guard = None;
        true
    }

    /// A restarted actor takes its place.
    pub(super) fn attach(&self, addr: Addr<StockActor>) {
        *self.slot_mut() = Some(addr);
    }
}

/// Durable orders by id and by user, written by stock actors the moment the
/// order log confirms them: read-your-writes before the order writers have
/// put them in PostgreSQL. Once PostgreSQL holds an order in the very state
/// kept here, the entry is forgotten: the order writers say what each write
/// stored (`forget_written`); an entry they stored before the actor put it
/// here (the broker may deliver a message before it confirms it) is found
/// by a slow sweeper that asks PostgreSQL (`older_than`, `forget_stored`,
/// every `orders.directory_evict_after_secs`). So the directory holds what
/// the writers lag behind on, not every order ever made. Orders are behind `Arc` so that growing the map moves
/// pointers, not orders, so that a check can tell an entry replaced since,
/// and so that the stock actor shares one copy of a confirmed order between
/// this directory and the buyer's answer. Hashed with foldhash: every durable
/// order is inserted, looked up and removed here, and SipHash over its id
/// was the larger part of that.
#[derive(Default)]
pub struct OrderDirectory {
    by_id: DashMap<Uuid, (Arc<Order>, std::time::Instant), UuidHasher>,
    by_user: DashMap<Uuid, Vec<Uuid>, UuidHasher>,
}

/// The directory's hasher: randomly seeded, so nobody picks colliding keys.
type UuidHasher = foldhash::quality::RandomState;

impl OrderDirectory {
    pub fn upsert(&self, order: Arc<Order>) {
        let (id, user_id) = (order.id, order.user_id);
        let entry = (order, std::time::Instant::now());
        if self.by_id.insert(id, entry).is_none() {
            self.by_user.entry(user_id).or_default().push(id);
        }
    }

    pub fn get(&self, id: Uuid) -> Option<Order> {
        self.by_id.get(&id).map(|e| e.0.as_ref().clone())
    }

    /// Orders kept for longer than `age` (at most `most`), as kept: the
    /// ones to look for in PostgreSQL.
    pub fn older_than(&self, age: std::time::Duration, most: usize) -> Vec<Arc<Order>> {
        self.by_id
            .iter()
            .filter(|e| e.value().1.elapsed() >= age)
            .take(most)
            .map(|e| e.value().0.clone())
            .collect()
    }

    /// Forgets each of `stored` (found in PostgreSQL in that state) whose
    /// entry has not been replaced since it was looked at.
    pub fn forget_stored(&self, stored: &[Arc<Order>]) {
        for order in stored {
            let removed = self
                .by_id
                .remove_if(&order.id, |_, kept| Arc::ptr_eq(&kept.0, order))
                .is_some();
            if removed {
                self.unlist(order);
            }
        }
    }

    /// Forgets the orders a writer stored, each in the state given, when
    /// that is still the state kept here (a later change stays until it is
    /// stored too; an order moves out of `reserved` only once).
    pub fn forget_written(&self, written: impl Iterator<Item = (Uuid, OrderStatus)>) {
        for (id, status) in written {
            if let Some((_, (order, _))) =
                self.by_id.remove_if(&id, |_, kept| kept.0.status == status)
            {
                self.unlist(&order);
            }
        }
    }

    /// Drops a forgotten order from its buyer's list (one upserted again
    /// meanwhile stays listed).
    fn unlist(&self, order: &Order) {
        if let Some(mut ids) = self.by_user.get_mut(&order.user_id) {
            ids.retain(|id| *id != order.id || self.by_id.contains_key(id));
        }
        self.by_user
            .remove_if(&order.user_id, |_, ids| ids.is_empty());
    }

    /// Orders kept (for status pages and tests).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn for_user(&self, user_id: Uuid) -> Vec<Order> {
        let Some(ids) = self.by_user.get(&user_id).map(|v| v.clone()) else {
            return Vec::new();
        };
        ids.iter().filter_map(|id| self.get(*id)).collect()
    }
}

/// What an idempotency key was first used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUse {
    pub sale: Uuid,
    pub quantity: u32,
}

/// How a purchase's key stands against the keys already used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// Never used by this buyer.
    New,
    /// Used for this very purchase (a replay, or one on its way).
    Same,
    /// Used for another sale or quantity: 422 `idempotency_key_reused`.
    Reused,
}

/// Every (buyer, idempotency key) with an order, or a purchase on its way to
/// a stock actor, across all sales. A key names one purchase: reusing it on
/// another sale or for another quantity is refused (as payment APIs do), and
/// a key never seen on a sale the hints call sold out is answered without
/// the actor. The HTTP layer claims a key before handing the purchase over;
/// the sale's actor keeps the claim while the book holds an order for it and
/// drops it otherwise, so the index holds what the books hold, plus what is
/// in flight.
pub struct KeyIndex {
    uses: DashMap<(Uuid, Box<str>), KeyUse>,
}

impl Default for KeyIndex {
    /// In 256 shards: a shard doubles on its own, moving all it holds while
    /// every caller of that shard waits; with a key per purchase of a large
    /// sale, dashmap's default (4 per core: 8 on two cores) made each such
    /// move an eighth of the index, as the book's growth was (see
    /// `domain::containers`).
    fn default() -> Self {
        KeyIndex {
            uses: DashMap::with_shard_amount(256),
        }
    }
}

impl KeyIndex {
    fn compare(found: KeyUse, wanted: KeyUse) -> KeyCheck {
        if found == wanted {
            KeyCheck::Same
        } else {
            KeyCheck::Reused
        }
    }

    /// How `key` of `user` stands, without claiming it.
    pub fn check(&self, user: Uuid, key: &str, wanted: KeyUse) -> KeyCheck {
        match self.uses.get(&(user, Box::from(key))) {
            Some(found) => Self::compare(*found, wanted),
            None => KeyCheck::New,
        }
    }

    /// Claims `key` for `wanted` if nobody has; how it stood before.
    pub fn claim(&self, user: Uuid, key: &str, wanted: KeyUse) -> KeyCheck {
        match self.uses.entry((user, Box::from(key))) {
            dashmap::Entry::Occupied(found) => Self::compare(*found.get(), wanted),
            dashmap::Entry::Vacant(slot) => {
                slot.insert(wanted);
                KeyCheck::New
            }
        }
    }

    /// Records the key of an order a book holds (recovery, a new order).
    pub fn record(&self, user: Uuid, key: &str, used: KeyUse) {
        self.uses.insert((user, Box::from(key)), used);
    }

    /// Drops a claim of `sale` that made no order.
    pub fn release(&self, user: Uuid, key: &str, sale: Uuid) {
        self.uses
            .remove_if(&(user, Box::from(key)), |_, used| used.sale == sale);
    }
}

/// Every sale this process runs, and the order directory.
/// Sales by id. Handles are shared (`Arc`): looking one up for a request
/// costs a reference count, not a new actor address.
#[derive(Default)]
pub struct SaleRegistry {
    sales: DashMap<Uuid, Arc<SaleHandle>>,
    pub orders: OrderDirectory,
    pub keys: KeyIndex,
    /// Bumped whenever any sale publishes a new state.
    pub catalogue: Arc<Catalogue>,
}

impl SaleRegistry {
    pub fn insert(&self, id: Uuid, handle: SaleHandle) -> Arc<SaleHandle> {
        let handle = Arc::new(handle);
        self.sales.insert(id, handle.clone());
        // Streams of every sale look for it now that it can be found.
        self.catalogue.bump();
        handle
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<SaleHandle>> {
        self.sales.get(&id).map(|h| h.clone())
    }

    /// Every sale, in no particular order.
    pub fn all(&self) -> Vec<Arc<SaleHandle>> {
        self.sales.iter().map(|e| e.value().clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.sales.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sales.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn order(user: Uuid, status: OrderStatus) -> Order {
        Order {
            id: Uuid::now_v7(),
            sale_id: Uuid::now_v7(),
            user_id: user,
            quantity: 1,
            status,
            created_at: Utc::now(),
            expires_at: Utc::now(),
            paid_at: None,
            closed_at: None,
            idempotency_key: None,
            price_cents: 100,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn the_directory_forgets_what_postgres_holds_and_keeps_what_changed_since() {
        let dir = OrderDirectory::default();
        let user = Uuid::new_v4();
        let (a, b) = (
            order(user, OrderStatus::Reserved),
            order(user, OrderStatus::Reserved),
        );
        dir.upsert(Arc::new(a.clone()));
        dir.upsert(Arc::new(b.clone()));
        assert!(dir
            .older_than(std::time::Duration::from_secs(60), 10)
            .is_empty());
        let seen = dir.older_than(std::time::Duration::ZERO, 10);
        assert_eq!(seen.len(), 2);
        // `b` is paid after it was looked at: its entry is newer than what
        // PostgreSQL was found to hold, and stays.
        dir.upsert(Arc::new(Order {
            status: OrderStatus::Paid,
            ..b.clone()
        }));
        dir.forget_stored(&seen);
        assert_eq!(dir.len(), 1);
        assert_eq!(dir.get(a.id), None);
        assert_eq!(dir.get(b.id).map(|o| o.status), Some(OrderStatus::Paid));
        assert_eq!(
            dir.for_user(user).iter().map(|o| o.id).collect::<Vec<_>>(),
            [b.id]
        );
        // A writer stored `b` as reserved: the paid entry is newer, it stays.
        dir.forget_written([(b.id, OrderStatus::Reserved)].into_iter());
        assert_eq!(dir.len(), 1);
        dir.forget_written([(b.id, OrderStatus::Paid)].into_iter());
        assert!(dir.is_empty());
        assert!(dir.for_user(user).is_empty());
        assert!(dir.by_user.is_empty(), "no empty lists are left behind");
    }
}
