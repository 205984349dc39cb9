//! Purchases and orders: the hot path.
//!
//! A purchase is decided without touching a database: the sale's hints
//! answer the common "no"s, and the sale's stock actor decides the rest. The
//! handler then waits for the order log to make the order durable; only then
//! does it answer 201.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Shopper;
use super::error::{ApiError, Problem};
use super::json::{is_json, parse_json, read_body};
use super::sales::sale_id;
use super::AppState;
use crate::actors::registry::{KeyCheck, KeyIndex, KeyUse, SaleHandle, SaleRegistry, SendRefused};
use crate::actors::stock::{
    ActionReply, OrderAction, PurchaseReply, Reserve, ReserveBatch, StockActor,
};
use crate::domain::order::{Order, OrderStatus};
use crate::domain::sale_book::{settled_answer, Action, ActionRefused, Rejection};
use crate::domain::ValidationError;
use crate::metrics::ActionLabels;
use crate::payments::{PaymentError, PaymentOutcome};

/// The largest quantity one purchase may ask for (limits are per sale).
pub const MAX_QUANTITY: i64 = 10_000;
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    /// Units to reserve; 1 when left out (an empty body is fine too).
    #[serde(default)]
    pub quantity: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderList {
    pub orders: Vec<Order>,
}

/// The `Idempotency-Key` header: at most 128 printable ASCII characters.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::Invalid(ValidationError::new(
            "Idempotency-Key",
            "must be 1 to 128 printable ASCII characters",
        ))
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 128 || !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(invalid());
    }
    value
        .to_str()
        .map(|s| Some(s.to_owned()))
        .map_err(|_| invalid())
}

async fn quantity(req: &HttpRequest, payload: &mut Payload) -> Result<u32, ApiError> {
    let body = read_body(req, payload).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(1);
    }
    if !is_json(req) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body: PurchaseBody = parse_json(&body)?;
    let q = body.quantity.unwrap_or(1);
    if !(1..=MAX_QUANTITY).contains(&q) {
        return Err(ApiError::Invalid(ValidationError::new(
            "quantity",
            format!("must be from 1 to {MAX_QUANTITY}"),
        )));
    }
    Ok(u32::try_from(q).unwrap_or(1))
}

#[utoipa::path(post, path = "/api/v1/sales/{id}/purchases", tag = "shoppers",
    request_body(content = PurchaseBody, description = "optional; quantity defaults to 1"),
    params(("id" = String, Path, description = "sale id"),
        ("Idempotency-Key" = Option<String>, Header, description = "at most 128 printable ASCII characters; a replay returns the same order")),
    security(("shopper_token" = [])),
    responses((status = 201, description = "reserved, durably", body = Order),
        (status = 200, description = "a replay of the same Idempotency-Key", body = Order),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 404, description = "sale_not_found", body = Problem),
        (status = 409, description = "sold_out, limit_reached, not_started, ended or paused", body = Problem),
        (status = 422, description = "invalid_input, or idempotency_key_reused (the key was used with another quantity or sale)", body = Problem),
        (status = 429, description = "rate_limited", body = Problem),
        (status = 503, description = "overloaded or unavailable; see Retry-After", body = Problem)))]
pub async fn purchase(
    shopper: Shopper,
    state: &AppState,
    raw_id: &str,
    req: &HttpRequest,
    payload: &mut Payload,
) -> Result<HttpResponse, ApiError> {
    let sale = sale_id(raw_id)?;
    let outbox = req
        .app_data::<PurchaseOutbox>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("purchase outbox missing")))?;
    state
        .limits
        .check_user(shopper.user_id)
        .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
    let key = idempotency_key(req)?;
    let quantity = quantity(req, payload).await?;
    let handle = state.registry.get(sale).ok_or(ApiError::SaleNotFound)?;
    let user = shopper.user_id;
    let wanted = KeyUse { sale, quantity };
    // A key this buyer used before is a replay (answered by the actor
    // whatever the sale's state now) or a reuse (refused); any other
    // purchase may be refused from the hints, without the actor.
    let replay = match key
        .as_deref()
        .map(|k| state.registry.keys.check(user, k, wanted))
    {
        Some(KeyCheck::Reused) => return Err(ApiError::Rejected(Rejection::KeyReused)),
        Some(KeyCheck::Same) => true,
        Some(KeyCheck::New) | None => false,
    };
    if !replay {
        if let Some(r) = handle.shared.quick_rejection(Utc::now()) {
            return Err(ApiError::Rejected(r));
        }
    }
    let retry_after_secs = state.retry_after_secs;
    if !state.accepting_purchases() {
        return Err(ApiError::Unavailable {
            reason: "the order log is not accepting orders",
            retry_after_secs,
        });
    }
    state.admit_purchase()?;
    // Claim the key before the actor sees the purchase; the actor keeps the
    // claim if it makes the order and drops it if not.
    let claimed = match (&key, replay) {
        (Some(k), false) => match state.registry.keys.claim(user, k, wanted) {
            KeyCheck::Reused => return Err(ApiError::Rejected(Rejection::KeyReused)),
            KeyCheck::New => key.clone(),
            KeyCheck::Same => None,
        },
        _ => None,
    };
    let (tx, rx) = oneshot::channel();
    let msg = Reserve {
        user_id: shopper.user_id,
        quantity,
        idempotency_key: key,
        reply: tx,
        span: tracing::Span::current(),
    };
    let unavailable = ApiError::Unavailable {
        reason: "the order could not be made durable in time; it may still appear in your orders",
        retry_after_secs,
    };
    let asked = hand_over(state, outbox, &handle, claimed.is_some(), msg, rx).await;
    if let (Err(_), Some(k)) = (&asked, &claimed) {
        // Never reached the actor: the claim made no order.
        state.registry.keys.release(user, k, sale);
    }
    let Some(reply) = asked? else {
        return Err(unavailable);
    };
    match reply {
        PurchaseReply::Created(order) => {
            let mut created = HttpResponse::Created();
            created.insert_header((header::LOCATION, format!("/api/v1/orders/{}", order.id)));
            Ok(order_answer(created, &order))
        }
        PurchaseReply::Replayed(order) => Ok(order_answer(HttpResponse::Ok(), &order)),
        PurchaseReply::ReplayedStored(id) => match stored_order(state, id).await? {
            Some(order) => Ok(order_answer(HttpResponse::Ok(), &order)),
            None => Err(unavailable),
        },
        PurchaseReply::Rejected(r) => Err(ApiError::Rejected(r)),
        PurchaseReply::Overloaded => Err(ApiError::Overloaded { retry_after_secs }),
        PurchaseReply::Unavailable => Err(unavailable),
    }
}

/// Every answer whose body is one order: `Order::to_json`, the bytes serde
/// would write, without its generic path (every durable reservation's 201
/// is one).
fn order_answer(mut answer: HttpResponseBuilder, order: &Order) -> HttpResponse {
    answer
        .insert_header(header::ContentType::json())
        .body(order.to_json())
}

/// Purchases this HTTP worker took in and has not handed to their stock
/// actors yet. One per worker (built in the `App` factory), so it needs no
/// lock. The first purchase of a turn of the worker's event loop spawns a
/// task that runs after the turn's other ready tasks and hands each sale's
/// purchases to its actor in one message (`ReserveBatch`): the pipeline
/// thread wakes once for them, not once for each.
#[derive(Clone, Default)]
pub struct PurchaseOutbox(Rc<RefCell<Vec<Outgoing>>>);

/// A purchase on its way to its sale's actor; it holds a mailbox slot.
struct Outgoing {
    handle: Arc<SaleHandle>,
    /// This purchase claimed its idempotency key (released if it never
    /// reaches the actor).
    claimed: bool,
    reserve: Reserve,
}

impl PurchaseOutbox {
    fn push(&self, registry: &Arc<SaleRegistry>, outgoing: Outgoing) {
        let first = {
            let mut pending = self.0.borrow_mut();
            pending.push(outgoing);
            pending.len() == 1
        };
        if first {
            let (outbox, registry) = (self.clone(), registry.clone());
            actix_web::rt::spawn(async move { outbox.flush(&registry.keys) });
        }
    }

    /// Hands everything pending over, one message per sale, in the order
    /// taken in; a purchase that cannot be handed over is answered at once.
    fn flush(&self, keys: &KeyIndex) {
        let mut pending = std::mem::take(&mut *self.0.borrow_mut());
        while let Some(first) = pending.first() {
            let handle = first.handle.clone();
            let (of_sale, rest): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|o| Arc::ptr_eq(&o.handle, &handle));
            pending = rest;
            let claimed: Vec<bool> = of_sale.iter().map(|o| o.claimed).collect();
            let reserves = of_sale.into_iter().map(|o| o.reserve).collect();
            let Err((refused, ReserveBatch(reserves))) =
                handle.send_admitted(ReserveBatch(reserves))
            else {
                continue;
            };
            let full = matches!(refused, SendRefused::MailboxFull);
            let sale = handle.shared.sale().id;
            for (reserve, claimed) in reserves.into_iter().zip(claimed) {
                handle.shared.leave();
                if let (true, Some(k)) = (claimed, &reserve.idempotency_key) {
                    keys.release(reserve.user_id, k, sale);
                }
                let _ = reserve.reply.send(if full {
                    PurchaseReply::Overloaded
                } else {
                    PurchaseReply::Unavailable
                });
            }
        }
    }
}

/// Takes a mailbox slot for `msg` and leaves it in the worker's outbox, then
/// waits for the answer as `ask` does.
async fn hand_over(
    state: &AppState,
    outbox: &PurchaseOutbox,
    handle: &Arc<SaleHandle>,
    claimed: bool,
    msg: Reserve,
    reply: oneshot::Receiver<PurchaseReply>,
) -> Result<Option<PurchaseReply>, ApiError> {
    ensure_running(state, handle).await?;
    if !handle.shared.admit() {
        return Err(ApiError::Overloaded {
            retry_after_secs: state.retry_after_secs,
        });
    }
    let outgoing = Outgoing {
        handle: handle.clone(),
        claimed,
        reserve: msg,
    };
    outbox.push(&state.registry, outgoing);
    Ok(answer_in_time(state, reply).await)
}

/// Hands `msg` to the sale's actor within its mailbox bound and waits, up to
/// `orders.confirm_timeout_ms`, for the answer on `reply`: `None` when none
/// came in time (the order may still become durable).
async fn ask<M, R>(
    state: &AppState,
    handle: &Arc<SaleHandle>,
    msg: M,
    reply: oneshot::Receiver<R>,
) -> Result<Option<R>, ApiError>
where
    M: actix::Message<Result = ()> + Send + 'static,
    StockActor: actix::Handler<M>,
{
    let retry_after_secs = state.retry_after_secs;
    ensure_running(state, handle).await?;
    handle.send_bounded(msg).map_err(|refused| match refused {
        SendRefused::MailboxFull => ApiError::Overloaded { retry_after_secs },
        SendRefused::Stopped => ApiError::Unavailable {
            reason: "the sale is not running",
            retry_after_secs,
        },
    })?;
    Ok(answer_in_time(state, reply).await)
}

/// Starts the sale's actor again if it stopped while idle.
async fn ensure_running(state: &AppState, handle: &Arc<SaleHandle>) -> Result<(), ApiError> {
    if !handle.is_running() {
        state.running_actor(handle).await?;
    }
    Ok(())
}

/// The actor's answer, if it comes within `orders.confirm_timeout_ms`.
async fn answer_in_time<R>(state: &AppState, reply: oneshot::Receiver<R>) -> Option<R> {
    tokio::time::timeout(state.confirm_timeout, reply)
        .await
        .ok()
        .and_then(Result::ok)
}

/// Ids that are not UUIDs name no order.
fn order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::OrderNotFound)
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "shoppers", security(("shopper_token" = [])),
    responses((status = 200, body = OrderList),
        (status = 401, description = "unauthenticated", body = Problem)))]
pub async fn list_orders(
    shopper: Shopper,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut orders = state.store.user_orders(shopper.user_id, 500).await?;
    // The directory is at least as fresh as PostgreSQL: it wins.
    for fresh in state.registry.orders.for_user(shopper.user_id) {
        match orders.iter_mut().find(|o| o.id == fresh.id) {
            Some(slot) => *slot = fresh,
            None => orders.push(fresh),
        }
    }
    orders.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(HttpResponse::Ok().json(OrderList { orders }))
}

#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "shoppers", security(("shopper_token" = [])),
    params(("id" = String, Path, description = "order id")),
    responses((status = 200, body = Order),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 404, description = "order_not_found (also for another user's order)", body = Problem)))]
pub async fn get_order(
    shopper: Shopper,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    let order = match state.registry.orders.get(id) {
        Some(o) => Some(o),
        None => state.store.order(id).await?,
    };
    match order {
        Some(o) if o.user_id == shopper.user_id => Ok(order_answer(HttpResponse::Ok(), &o)),
        _ => Err(ApiError::OrderNotFound),
    }
}

/// An order as it stands: the directory first (durable, and at least as
/// fresh as PostgreSQL), then PostgreSQL.
async fn stored_order(state: &AppState, id: Uuid) -> Result<Option<Order>, ApiError> {
    Ok(match state.registry.orders.get(id) {
        Some(o) => Some(o),
        None => state.store.order(id).await?,
    })
}

/// An order of `user_id` (404 for anyone else's).
async fn owned_order(state: &AppState, user_id: Uuid, raw_id: &str) -> Result<Order, ApiError> {
    stored_order(state, order_id(raw_id)?)
        .await?
        .filter(|o| o.user_id == user_id)
        .ok_or(ApiError::OrderNotFound)
}

/// The answer to `action` on an order in a final state, which never changes
/// again: decided from the order as stored, without its sale's actor.
fn settled(order: &Order, action: Action) -> Option<Result<(Order, bool), ActionRefused>> {
    settled_answer(order.status, action).map(|answer| answer.map(|()| (order.clone(), false)))
}

fn refusal(r: ActionRefused, unavailable: ApiError) -> ApiError {
    match r {
        ActionRefused::NotFound => ApiError::OrderNotFound,
        ActionRefused::Expired => ApiError::ReservationExpired,
        ActionRefused::Cancelled => ApiError::OrderCancelled,
        ActionRefused::Paid => ApiError::OrderPaid,
        ActionRefused::NotDurable => unavailable,
    }
}

/// Asks the order's stock actor to pay or cancel it, and waits for the
/// decision to be durable.
pub(crate) async fn act(
    state: &AppState,
    order: &Order,
    action: Action,
) -> Result<(Order, bool), ApiError> {
    let retry_after_secs = state.retry_after_secs;
    let handle = state
        .registry
        .get(order.sale_id)
        .ok_or(ApiError::OrderNotFound)?;
    if !state.accepting_purchases() {
        return Err(ApiError::Unavailable {
            reason: "the order log is not accepting changes",
            retry_after_secs,
        });
    }
    let (tx, rx) = oneshot::channel();
    let msg = OrderAction {
        order_id: order.id,
        user_id: order.user_id,
        action,
        reply: tx,
        span: tracing::Span::current(),
    };
    let unavailable = || ApiError::Unavailable {
        reason: "the change could not be made durable in time",
        retry_after_secs,
    };
    let result = match settled(order, action) {
        Some(answer) => answer.map_err(|r| refusal(r, unavailable())),
        None => match ask(state, &handle, msg, rx).await? {
            Some(ActionReply::Done { order, changed }) => Ok((order, changed)),
            // Settled since it was read: the actor forgot it, the store has it.
            Some(ActionReply::Refused(ActionRefused::NotFound)) => {
                match stored_order(state, order.id)
                    .await?
                    .and_then(|o| settled(&o, action))
                {
                    Some(answer) => answer.map_err(|r| refusal(r, unavailable())),
                    None => Err(ApiError::OrderNotFound),
                }
            }
            Some(ActionReply::Refused(r)) => Err(refusal(r, unavailable())),
            Some(ActionReply::Overloaded) => Err(ApiError::Overloaded { retry_after_secs }),
            Some(ActionReply::Unavailable) | None => Err(unavailable()),
        },
    };
    let outcome = match &result {
        Ok((_, true)) => "done",
        Ok((_, false)) => "repeated",
        Err(e) => e.code(),
    };
    let action = match action {
        Action::Pay => "pay",
        Action::Cancel => "cancel",
    };
    state
        .metrics
        .order_actions
        .get_or_create(&ActionLabels { action, outcome })
        .inc();
    result
}

/// Pays an order whose charge the provider approved; refunds the charge if
/// the payment does not win (expired or cancelled), and, when `charged_here`
/// (this call took the money), also if another call had paid it already. A
/// webhook delivered twice reports one charge twice: nothing to refund.
pub(crate) async fn pay_approved(
    state: &AppState,
    order: &Order,
    charged_here: bool,
) -> Result<(Order, bool), ApiError> {
    let result = act(state, order, Action::Pay).await;
    let refund = match &result {
        Ok((_, changed)) => !changed && charged_here,
        Err(ApiError::ReservationExpired | ApiError::OrderCancelled | ApiError::OrderNotFound) => {
            true
        }
        Err(_) => false,
    };
    if refund {
        state.metrics.refunds.inc();
        if let Err(e) = state.payments.refund(order).await {
            tracing::error!(order_id = %order.id, error = %e, "refund failed; needs attention");
        }
    }
    result
}

#[utoipa::path(post, path = "/api/v1/orders/{id}/payment", tag = "shoppers",
    security(("shopper_token" = [])),
    params(("id" = String, Path, description = "order id")),
    responses((status = 200, description = "paid (repeating it is harmless)", body = Order),
        (status = 202, description = "the provider will confirm on the webhook", body = Order),
        (status = 402, description = "payment_declined", body = Problem),
        (status = 404, description = "order_not_found", body = Problem),
        (status = 409, description = "reservation_expired or order_cancelled", body = Problem),
        (status = 503, description = "overloaded or unavailable", body = Problem)))]
pub async fn pay(
    shopper: Shopper,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let order = owned_order(&state, shopper.user_id, &path).await?;
    match order.status {
        OrderStatus::Paid => return Ok(order_answer(HttpResponse::Ok(), &order)),
        OrderStatus::Cancelled => return Err(ApiError::OrderCancelled),
        OrderStatus::Expired => return Err(ApiError::ReservationExpired),
        OrderStatus::Reserved => {}
    }
    // The price fixed when the reservation was made, not the sale's now.
    let amount = order.price_cents.saturating_mul(i64::from(order.quantity));
    match state.payments.charge(&order, amount, &order.currency).await {
        Ok(PaymentOutcome::Approved) => {
            let (order, _) = pay_approved(&state, &order, true).await?;
            Ok(order_answer(HttpResponse::Ok(), &order))
        }
        Ok(PaymentOutcome::Pending) => Ok(order_answer(HttpResponse::Accepted(), &order)),
        Err(PaymentError::Declined(why)) => Err(ApiError::PaymentDeclined(why)),
        Err(PaymentError::Unavailable(_)) => Err(ApiError::Unavailable {
            reason: "the payment provider is unavailable",
            retry_after_secs: state.retry_after_secs,
        }),
    }
}

#[utoipa::path(post, path = "/api/v1/orders/{id}/cancel", tag = "shoppers",
    security(("shopper_token" = [])),
    params(("id" = String, Path, description = "order id")),
    responses((status = 200, description = "cancelled, its units back on sale (repeating it is harmless)", body = Order),
        (status = 404, description = "order_not_found", body = Problem),
        (status = 409, description = "order_paid or reservation_expired", body = Problem),
        (status = 503, description = "overloaded or unavailable", body = Problem)))]
pub async fn cancel(
    shopper: Shopper,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let order = owned_order(&state, shopper.user_id, &path).await?;
    let (order, _) = act(&state, &order, Action::Cancel).await?;
    Ok(order_answer(HttpResponse::Ok(), &order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::registry::SaleShared;
    use crate::domain::sale::{Sale, SaleSpec};
    use crate::domain::sale_book::SaleBook;

    fn sale() -> Sale {
        let now = Utc::now();
        Sale {
            id: Uuid::now_v7(),
            spec: SaleSpec::example(),
            paused: false,
            created_at: now,
            updated_at: now,
        }
    }

    /// Purchases whose actor is gone by the time the outbox hands them over
    /// are answered at once, give their mailbox slots back and let go of
    /// the idempotency keys they claimed (and only those).
    #[actix_web::test]
    async fn a_batch_its_actor_cannot_take_is_answered_and_gives_back_slots_and_claims() {
        let sale = sale();
        let shared = Arc::new(SaleShared::new(
            &SaleBook::new(sale.clone()),
            8,
            Default::default(),
        ));
        let handle = Arc::new(SaleHandle::detached(shared.clone()));
        let keys = KeyIndex::default();
        let outbox = PurchaseOutbox::default();
        let wanted = KeyUse {
            sale: sale.id,
            quantity: 1,
        };
        let (claimer, replayer) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(keys.claim(claimer, "k", wanted), KeyCheck::New);
        assert_eq!(keys.claim(replayer, "k", wanted), KeyCheck::New);
        let mut answers = Vec::new();
        for (user, claimed) in [(claimer, true), (replayer, false)] {
            assert!(shared.admit());
            let (tx, rx) = oneshot::channel();
            answers.push(rx);
            outbox.0.borrow_mut().push(Outgoing {
                handle: handle.clone(),
                claimed,
                reserve: Reserve {
                    user_id: user,
                    quantity: 1,
                    idempotency_key: Some("k".into()),
                    reply: tx,
                    span: tracing::Span::none(),
                },
            });
        }
        assert_eq!(shared.mailbox_depth(), 2);
        outbox.flush(&keys);
        for rx in answers {
            assert!(matches!(rx.await, Ok(PurchaseReply::Unavailable)));
        }
        assert_eq!(shared.mailbox_depth(), 0);
        assert!(outbox.0.borrow().is_empty());
        // The claimer's key is free again; the replayer's claim (made by
        // an earlier purchase) stays.
        assert_eq!(keys.check(claimer, "k", wanted), KeyCheck::New);
        assert_eq!(keys.check(replayer, "k", wanted), KeyCheck::Same);
    }
}
