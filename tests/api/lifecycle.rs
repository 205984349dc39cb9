//! Reservations end exactly one way: paid, cancelled or expired, and units
//! come back exactly once.

use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::helpers::{
    assert_counters_match, assert_problem, mint_shopper, spawn_app_with, TestApp,
};
use crate::helpers::{both_modes, spawn_app_in, test_settings_in, Mode};

async fn reserve(app: &TestApp, sale_id: &str) -> (String, Value) {
    let (_, token) = mint_shopper(&app.settings);
    let (status, order) = app.purchase(sale_id, &token, None, None).await;
    assert_eq!(status, 201, "{order}");
    (token, order)
}

fn path(order: &Value, action: &str) -> String {
    format!(
        "/api/v1/orders/{}/{action}",
        order["id"].as_str().unwrap_or_default()
    )
}

async fn pay_then_repeat_then_cancel_is_refused(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app.create_sale(json!({"stock_total": 3})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (token, order) = reserve(&app, sale_id).await;
    let (status, paid) = app.call(&path(&order, "payment"), &token).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(paid["status"], "paid");
    assert!(paid["paid_at"].is_string());
    let (status, again) = app.call(&path(&order, "payment"), &token).await;
    assert_eq!(
        (status, &again["id"], &again["status"]),
        (200, &order["id"], &json!("paid"))
    );
    let res = app
        .post(&path(&order, "cancel"), &json!({}), Some(&token))
        .await;
    assert_problem(res, 409, "order_paid").await;
    // Someone else's order does not exist for them.
    let (_, stranger) = mint_shopper(&app.settings);
    assert_problem(
        app.post(&path(&order, "payment"), &json!({}), Some(&stranger))
            .await,
        404,
        "order_not_found",
    )
    .await;
    assert_problem(
        app.post("/api/v1/orders/nope/cancel", &json!({}), Some(&token))
            .await,
        404,
        "order_not_found",
    )
    .await;
    let seen: Value = app
        .get(
            &format!(
                "/api/v1/orders/{}",
                order["id"].as_str().unwrap_or_default()
            ),
            Some(&token),
        )
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(seen["status"], "paid");
    let view = assert_counters_match(&app, sale_id).await;
    assert_eq!(
        (view["paid"].as_i64(), view["stock_left"].as_i64()),
        (Some(1), Some(2))
    );
    app.teardown().await;
}

async fn cancel_returns_stock_and_the_buyer_may_buy_again(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app
        .create_sale(json!({"stock_total": 1, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (token, order) = reserve(&app, sale_id).await;
    let (_, other) = mint_shopper(&app.settings);
    assert_eq!(
        app.purchase(sale_id, &other, None, None).await.1["code"],
        "sold_out"
    );
    let (status, cancelled) = app.call(&path(&order, "cancel"), &token).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    // Repeating it is harmless; paying it now is refused.
    assert_eq!(app.call(&path(&order, "cancel"), &token).await.0, 200);
    assert_problem(
        app.post(&path(&order, "payment"), &json!({}), Some(&token))
            .await,
        409,
        "order_cancelled",
    )
    .await;
    let view: Value = app
        .get(&format!("/api/v1/sales/{sale_id}"), None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(
        (view["stock_left"].as_i64(), view["status"].as_str()),
        (Some(1), Some("live"))
    );
    // The same buyer, within the limit again, buys the unit back.
    let (status, again) = app.purchase(sale_id, &token, None, None).await;
    assert_eq!(status, 201, "{again}");
    assert_ne!(again["id"], order["id"]);
    let view = assert_counters_match(&app, sale_id).await;
    assert_eq!(
        (
            view["cancelled"].as_i64(),
            view["reserved"].as_i64(),
            view["stock_left"].as_i64()
        ),
        (Some(1), Some(1), Some(0))
    );
    app.teardown().await;
}

async fn expiry_returns_stock_exactly_once(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app
        .create_sale(json!({"stock_total": 2, "reservation_ttl_secs": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (token, order) = reserve(&app, sale_id).await;
    let (token2, order2) = reserve(&app, sale_id).await;
    assert_eq!(app.call(&path(&order2, "payment"), &token2).await.0, 200);
    actix_web::rt::time::sleep(Duration::from_millis(1600)).await;
    let seen: Value = app
        .get(
            &format!(
                "/api/v1/orders/{}",
                order["id"].as_str().unwrap_or_default()
            ),
            Some(&token),
        )
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(seen["status"], "expired", "{seen}");
    assert!(seen["closed_at"].is_string());
    assert_problem(
        app.post(&path(&order, "payment"), &json!({}), Some(&token))
            .await,
        409,
        "reservation_expired",
    )
    .await;
    assert_problem(
        app.post(&path(&order, "cancel"), &json!({}), Some(&token))
            .await,
        409,
        "reservation_expired",
    )
    .await;
    // Waiting longer gives nothing back twice; the paid order never expires.
    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
    let view = assert_counters_match(&app, sale_id).await;
    assert_eq!(
        (
            view["expired"].as_i64(),
            view["paid"].as_i64(),
            view["stock_left"].as_i64()
        ),
        (Some(1), Some(1), Some(1))
    );
    app.teardown().await;
}

async fn payment_racing_expiry_has_exactly_one_outcome_per_order(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let n = 60;
    let sale = app
        .create_sale(json!({"stock_total": n, "reservation_ttl_secs": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let mut orders = Vec::new();
    for _ in 0..n {
        orders.push(reserve(&app, &sale_id).await);
    }
    // Pay each at a moment around its own deadline: from 60 ms before to 60 ms after.
    let attempts = orders.iter().enumerate().map(|(i, (token, order))| {
        let app = &app;
        async move {
            let expires: chrono::DateTime<Utc> =
                serde_json::from_value(order["expires_at"].clone()).unwrap_or_default();
            let offset = chrono::Duration::milliseconds((i as i64 % 13) * 10 - 60);
            let wait = (expires + offset - Utc::now()).to_std().unwrap_or_default();
            actix_web::rt::time::sleep(wait).await;
            let (status, body) = app.call(&path(order, "payment"), token).await;
            (order["id"].clone(), status, body)
        }
    });
    let results = join_all(attempts).await;
    let mut paid = 0;
    let mut expired = 0;
    for (_, status, body) in &results {
        match (status, body["code"].as_str(), body["status"].as_str()) {
            (200, _, Some("paid")) => paid += 1,
            (409, Some("reservation_expired"), _) => expired += 1,
            other => panic!("unexpected {other:?}: {body}"),
        }
    }
    assert_eq!(paid + expired, n, "one answer per order");
    assert!(
        paid > 0 && expired > 0,
        "the race was run on both sides: {paid} paid, {expired} expired"
    );
    // Every answer is what is stored, and the units add up.
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    for (id, status, _) in &results {
        let (token, _) = orders
            .iter()
            .find(|(_, o)| &o["id"] == id)
            .cloned()
            .unwrap_or_default();
        let seen: Value = app
            .get(
                &format!("/api/v1/orders/{}", id.as_str().unwrap_or_default()),
                Some(&token),
            )
            .await
            .json()
            .await
            .unwrap_or_default();
        let expect = if *status == 200 { "paid" } else { "expired" };
        assert_eq!(seen["status"], expect, "{seen}");
    }
    let view = assert_counters_match(&app, &sale_id).await;
    assert_eq!(view["paid"].as_i64(), Some(paid as i64));
    assert_eq!(view["expired"].as_i64(), Some(expired as i64));
    assert_eq!(view["stock_left"].as_i64(), Some(expired as i64));
    app.teardown().await;
}

async fn expiry_survives_a_restart_and_a_deadline_passed_while_down(mode: Mode) {
    let settings = test_settings_in(mode);
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 3, "reservation_ttl_secs": 2}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let (_, early) = reserve(&app, &sale_id).await;
    actix_web::rt::time::sleep(Duration::from_millis(1000)).await;
    let (_, late) = reserve(&app, &sale_id).await;
    let settings = app.stop().await;

    // Down while `early`'s deadline passes: it expires at start.
    actix_web::rt::time::sleep(Duration::from_millis(1300)).await;
    let app = spawn_app_with(settings).await;
    let late_expires: chrono::DateTime<Utc> =
        serde_json::from_value(late["expires_at"].clone()).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let checked_at = Utc::now();
        let view = app.admin_sale(&sale_id).await;
        if view["expired"].as_i64() >= Some(1) {
            // `early` expired at start; `late` only if its own deadline has
            // come too (a slow restart on a loaded machine can take that long).
            if checked_at < late_expires {
                assert_eq!(view["reserved"].as_i64(), Some(1), "{view}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no expiry at start: {view}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    // `late`'s deadline passes after the restart: expiry goes on.
    let expires: chrono::DateTime<Utc> =
        serde_json::from_value(late["expires_at"].clone()).unwrap_or_default();
    actix_web::rt::time::sleep(
        (expires - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(500),
    )
    .await;
    let view = assert_counters_match(&app, &sale_id).await;
    assert_eq!(
        (
            view["expired"].as_i64(),
            view["reserved"].as_i64(),
            view["stock_left"].as_i64()
        ),
        (Some(2), Some(0), Some(3)),
        "{view}"
    );
    assert_ne!(early["id"], late["id"]);
    app.teardown().await;
}

async fn a_mixed_run_keeps_every_count_exact(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app
        .create_sale(json!({"stock_total": 30, "reservation_ttl_secs": 1, "per_user_limit": 2}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let buyers: Vec<(uuid::Uuid, String)> = (0..25).map(|_| mint_shopper(&app.settings)).collect();
    let work = buyers.iter().enumerate().map(|(i, (_, token))| {
        let app = &app;
        let sale_id = &sale_id;
        async move {
            for round in 0..3 {
                let (status, order) = app
                    .purchase(
                        sale_id,
                        token,
                        Some(json!({"quantity": 1 + (i + round) % 2})),
                        None,
                    )
                    .await;
                if status != 201 {
                    continue;
                }
                match (i + round) % 3 {
                    0 => assert_eq!(app.call(&path(&order, "payment"), token).await.0, 200),
                    1 => assert_eq!(app.call(&path(&order, "cancel"), token).await.0, 200),
                    _ => {} // left to expire
                }
            }
        }
    });
    join_all(work).await;
    actix_web::rt::time::sleep(Duration::from_millis(1500)).await;
    let view = assert_counters_match(&app, &sale_id).await;
    assert_eq!(
        view["reserved"].as_i64(),
        Some(0),
        "everything unpaid has expired: {view}"
    );
    assert!(
        view["paid"].as_i64().unwrap_or(0) > 0
            && view["cancelled"].as_i64().unwrap_or(0) > 0
            && view["expired"].as_i64().unwrap_or(0) > 0,
        "{view}"
    );
    app.teardown().await;
}

mod webhook {
    use super::*;
    use flashsale::config::PaymentProviderKind;
    use flashsale::payments::WebhookVerifier;

    async fn deliver(app: &TestApp, body: &Value, signature: Option<String>) -> (u16, Value) {
        let raw = serde_json::to_vec(body).unwrap_or_default();
        let verifier = WebhookVerifier::new(&app.settings.payments);
        let header = signature.unwrap_or_else(|| verifier.sign(Utc::now().timestamp(), &raw));
        let res = app
            .client
            .post(app.url("/api/v1/payments/webhook"))
            .header("content-type", "application/json")
            .header("flashsale-signature", header)
            .body(raw)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or_default())
    }

    async fn signed_deliveries_pay_once_and_bad_ones_are_refused(mode: Mode) {
        let mut settings = test_settings_in(mode);
        settings.payments.provider = PaymentProviderKind::Webhook;
        let app = spawn_app_with(settings).await;
        let sale = app
            .create_sale(json!({"stock_total": 5, "reservation_ttl_secs": 2}))
            .await;
        let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
        let (token, order) = reserve(&app, &sale_id).await;
        // The provider is asynchronous: the payment waits for the webhook.
        let (status, pending) = app.call(&path(&order, "payment"), &token).await;
        assert_eq!(
            (status, pending["status"].as_str()),
            (202, Some("reserved")),
            "{pending}"
        );

        let event = json!({"event_id": "evt_1", "order_id": order["id"], "outcome": "succeeded"});
        // Refused: no signature, a wrong one, a stale one, another secret.
        let verifier = WebhookVerifier::new(&app.settings.payments);
        let raw = serde_json::to_vec(&event).unwrap_or_default();
        let now = Utc::now().timestamp();
        let tampered = serde_json::to_vec(
            &json!({"event_id": "evt_1", "order_id": order["id"], "outcome": "failed"}),
        )
        .unwrap_or_default();
        for bad in [
            String::new(),
            verifier.sign(now, &tampered),
            verifier.sign(now - 301, &raw),
            format!("t={now},v1={}", "00".repeat(32)),
        ] {
            let (status, body) = deliver(&app, &event, Some(bad)).await;
            assert_eq!(
                (status, body["code"].as_str()),
                (401, Some("invalid_signature")),
                "{body}"
            );
        }
        let seen: Value = app
            .get(
                &format!(
                    "/api/v1/orders/{}",
                    order["id"].as_str().unwrap_or_default()
                ),
                Some(&token),
            )
            .await
            .json()
            .await
            .unwrap_or_default();
        assert_eq!(
            seen["status"], "reserved",
            "refused deliveries changed nothing"
        );

        // Valid: paid; the same event again: the same answer, nothing
        // changes; another event for the paid order: already paid.
        for _ in 0..2 {
            let (status, body) = deliver(&app, &event, None).await;
            assert_eq!(
                (
                    status,
                    body["result"].as_str(),
                    body["order"]["status"].as_str()
                ),
                (200, Some("paid"), Some("paid")),
                "{body}"
            );
        }
        let again = json!({"event_id": "evt_1b", "order_id": order["id"], "outcome": "succeeded"});
        let (status, body) = deliver(&app, &again, None).await;
        assert_eq!(
            (status, body["result"].as_str()),
            (200, Some("already_paid")),
            "{body}"
        );

        // Unknown order, malformed event.
        let (status, body) = deliver(
            &app,
            &json!({"event_id": "evt_2", "order_id": uuid::Uuid::new_v4(), "outcome": "succeeded"}),
            None,
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("order_not_found"))
        );
        let (status, body) = deliver(
            &app,
            &json!({"event_id": "evt_3", "order_id": order["id"], "outcome": "maybe"}),
            None,
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("invalid_input"))
        );

        // A payment that arrives after the reservation expired is refunded,
        // once, however often the provider delivers it.
        let (_, late) = reserve(&app, &sale_id).await;
        actix_web::rt::time::sleep(Duration::from_millis(2600)).await;
        let late_event =
            json!({"event_id": "evt_4", "order_id": late["id"], "outcome": "succeeded"});
        for _ in 0..3 {
            let (status, body) = deliver(&app, &late_event, None).await;
            assert_eq!(
                (
                    status,
                    body["result"].as_str(),
                    body["order"]["status"].as_str()
                ),
                (200, Some("refund"), Some("expired")),
                "{body}"
            );
        }
        let metrics = app
            .get("/metrics", None)
            .await
            .text()
            .await
            .unwrap_or_default();
        assert!(
            metrics
                .lines()
                .any(|l| l == "flashsale_payment_refunds_total 1"),
            "one refund: {metrics}"
        );
        // A failed charge changes nothing.
        let (_, third) = reserve(&app, &sale_id).await;
        let (status, body) = deliver(
            &app,
            &json!({"event_id": "evt_5", "order_id": third["id"], "outcome": "failed"}),
            None,
        )
        .await;
        assert_eq!((status, body["result"].as_str()), (200, Some("ignored")));
        let view = assert_counters_match(&app, &sale_id).await;
        assert_eq!(
            (
                view["paid"].as_i64(),
                view["expired"].as_i64(),
                view["reserved"].as_i64()
            ),
            (Some(1), Some(1), Some(1)),
            "{view}"
        );
        app.teardown().await;
    }

    both_modes!(signed_deliveries_pay_once_and_bad_ones_are_refused);
}

both_modes!(
    pay_then_repeat_then_cancel_is_refused,
    cancel_returns_stock_and_the_buyer_may_buy_again,
    expiry_returns_stock_exactly_once,
    payment_racing_expiry_has_exactly_one_outcome_per_order,
    expiry_survives_a_restart_and_a_deadline_passed_while_down,
    a_mixed_run_keeps_every_count_exact,
);
