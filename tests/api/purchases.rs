//! The purchase path end to end: stock actors, the order log, the writers.

use std::collections::{HashMap, HashSet};

use chrono::{Duration, Utc};
use futures_util::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    assert_problem, assert_sale_invariants, mint_shopper, rfc3339, spawn_app_with, uuid_of,
    wait_for_orders, ADMIN_TOKEN,
};
use crate::helpers::{both_modes, spawn_app_in, test_settings_in, Mode, Probe};

async fn a_crowd_buys_exactly_the_stock(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app
        .create_sale(json!({"stock_total": 100, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let users: Vec<(Uuid, String)> = (0..500).map(|_| mint_shopper(&app.settings)).collect();
    // 2,000 attempts: every user four times, all at once.
    let attempts = (0..2000).map(|i| {
        let (user, token) = users[i % users.len()].clone();
        let app = &app;
        let sale_id = &sale_id;
        async move {
            let (status, body) = app.purchase(sale_id, &token, None, None).await;
            (user, status, body)
        }
    });
    let results = join_all(attempts).await;
    let mut won: HashMap<Uuid, Uuid> = HashMap::new();
    let mut codes: HashMap<String, usize> = HashMap::new();
    for (user, status, body) in &results {
        match status {
            201 => {
                assert_eq!(uuid_of(&body["user_id"]), *user);
                assert_eq!(body["status"], "reserved");
                let order = uuid_of(&body["id"]);
                assert!(
                    won.insert(*user, order).is_none(),
                    "user {user} got two orders"
                );
            }
            409 => {
                *codes
                    .entry(body["code"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(won.len(), 100, "exactly the stock is sold: {codes:?}");
    assert_eq!(codes.values().sum::<usize>(), 1900);
    assert!(
        codes
            .keys()
            .all(|c| c == "sold_out" || c == "limit_reached"),
        "{codes:?}"
    );

    let view: Value = app
        .get(&format!("/api/v1/sales/{sale_id}"), None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(view["stock_left"], 0);
    assert_eq!(view["status"], "sold_out");

    let db = Probe::open(&app.settings).await;
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), 100).await;
    let answered: HashSet<Uuid> = won.values().copied().collect();
    assert_eq!(
        stored, answered,
        "PostgreSQL holds exactly the orders answered 201"
    );
    assert_eq!(assert_sale_invariants(&db, uuid_of(&sale["id"])).await, 100);
    app.teardown().await;
}

async fn racing_replays_of_one_idempotency_key_make_one_order(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app
        .create_sale(json!({"stock_total": 5, "per_user_limit": 2}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let (_, token) = mint_shopper(&app.settings);
    let results =
        join_all((0..10).map(|_| app.purchase(&sale_id, &token, None, Some("order-42")))).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let replayed = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, replayed), (1, 9), "{results:?}");
    let ids: HashSet<&Value> = results.iter().map(|(_, b)| &b["id"]).collect();
    assert_eq!(ids.len(), 1, "every answer names the same order");

    // A later replay answers the same order; the key with another quantity
    // is another purchase under a used key: refused.
    let (status, body) = app.purchase(&sale_id, &token, None, Some("order-42")).await;
    assert_eq!(status, 200);
    assert_eq!(&&body["id"], ids.iter().next().unwrap_or(&&Value::Null));
    let (status, body) = app
        .purchase(
            &sale_id,
            &token,
            Some(json!({"quantity": 2})),
            Some("order-42"),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{body}"
    );
    // A new key is a new purchase within the limit.
    let (status, _) = app.purchase(&sale_id, &token, None, Some("order-43")).await;
    assert_eq!(status, 201);
    let (status, body) = app.purchase(&sale_id, &token, None, Some("order-44")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("limit_reached"))
    );

    let db = Probe::open(&app.settings).await;
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), 2).await;
    assert_eq!(stored.len(), 2);
    let keyed = db
        .orders(uuid_of(&sale["id"]))
        .await
        .iter()
        .filter(|o| o.idempotency_key.as_deref() == Some("order-42"))
        .count();
    assert_eq!(keyed, 1);
    app.teardown().await;
}

async fn an_order_is_visible_to_its_owner_at_once_and_to_no_one_else(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app.create_sale(json!({"stock_total": 3})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = app.new_shopper().await;
    let (_, other) = app.new_shopper().await;
    let (status, order) = app
        .purchase(sale_id, &token, Some(json!({"quantity": 1})), None)
        .await;
    assert_eq!(status, 201, "{order}");
    let id = order["id"].as_str().unwrap_or_default();
    // Read-your-writes: no waiting for the writers.
    let res = app.get(&format!("/api/v1/orders/{id}"), Some(&token)).await;
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap_or_default();
    assert_eq!(seen, order);
    let list: Value = app
        .get("/api/v1/orders", Some(&token))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(list["orders"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["orders"][0]["id"], order["id"]);
    // Another user sees nothing of it.
    assert_problem(
        app.get(&format!("/api/v1/orders/{id}"), Some(&other)).await,
        404,
        "order_not_found",
    )
    .await;
    let list: Value = app
        .get("/api/v1/orders", Some(&other))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(list["orders"].as_array().map(Vec::len), Some(0));
    assert_problem(
        app.get("/api/v1/orders/not-an-id", Some(&token)).await,
        404,
        "order_not_found",
    )
    .await;
    assert_problem(
        app.get(&format!("/api/v1/orders/{}", Uuid::new_v4()), Some(&token))
            .await,
        404,
        "order_not_found",
    )
    .await;
    assert_problem(
        app.get("/api/v1/orders", None).await,
        401,
        "unauthenticated",
    )
    .await;
    app.teardown().await;
}

async fn every_purchase_error_code(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let now = Utc::now();
    let live = app
        .create_sale(json!({"stock_total": 2, "per_user_limit": 1}))
        .await;
    let live_id = live["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    let path = format!("/api/v1/sales/{live_id}/purchases");

    // 401: no token, a garbage token, a token signed with another secret.
    assert_problem(
        app.post(&path, &json!({}), None).await,
        401,
        "unauthenticated",
    )
    .await;
    assert_problem(
        app.post(&path, &json!({}), Some("garbage")).await,
        401,
        "unauthenticated",
    )
    .await;
    let mut foreign = test_settings_in(mode);
    foreign.auth.jwt_secret = secrecy::SecretString::from("another-secret-entirely-for-tests");
    let (_, forged) = mint_shopper(&foreign);
    assert_problem(
        app.post(&path, &json!({}), Some(&forged)).await,
        401,
        "unauthenticated",
    )
    .await;

    // 404: no such sale, or not an id.
    let (s, b) = app
        .purchase(&Uuid::new_v4().to_string(), &token, None, None)
        .await;
    assert_eq!((s, b["code"].as_str()), (404, Some("sale_not_found")));
    let (s, b) = app.purchase("nope", &token, None, None).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("sale_not_found")));

    // 422: quantities and keys that are not allowed, unknown fields.
    for body in [
        json!({"quantity": 0}),
        json!({"quantity": -3}),
        json!({"quantity": "2"}),
        json!({"quantity": 10_001}),
        json!({"qty": 1}),
    ] {
        let (s, b) = app
            .purchase(live_id, &token, Some(body.clone()), None)
            .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("invalid_input")),
            "{body}"
        );
    }
    for key in ["", &"k".repeat(129) as &str, "tab\there"] {
        let (s, b) = app.purchase(live_id, &token, None, Some(key)).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("invalid_input")),
            "{key:?}"
        );
    }

    // 409 limit_reached: quantity above the limit, then a second purchase.
    let (s, b) = app
        .purchase(live_id, &token, Some(json!({"quantity": 2})), None)
        .await;
    assert_eq!((s, b["code"].as_str()), (409, Some("limit_reached")));
    let (s, _) = app.purchase(live_id, &token, None, None).await;
    assert_eq!(s, 201);
    let (s, b) = app.purchase(live_id, &token, None, None).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("limit_reached")));
    // 409 sold_out.
    let (_, t2) = mint_shopper(&app.settings);
    let (_, t3) = mint_shopper(&app.settings);
    assert_eq!(app.purchase(live_id, &t2, None, None).await.0, 201);
    let (s, b) = app.purchase(live_id, &t3, None, None).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("sold_out")));

    // 409 not_started, ended, paused.
    let later = app
        .create_sale(json!({"starts_at": rfc3339(now + Duration::hours(1)), "ends_at": rfc3339(now + Duration::hours(2))}))
        .await;
    let (s, b) = app
        .purchase(later["id"].as_str().unwrap_or_default(), &token, None, None)
        .await;
    assert_eq!((s, b["code"].as_str()), (409, Some("not_started")));
    let over = app
        .create_sale(json!({"starts_at": rfc3339(now - Duration::hours(2)), "ends_at": rfc3339(now - Duration::hours(1))}))
        .await;
    let (s, b) = app
        .purchase(over["id"].as_str().unwrap_or_default(), &token, None, None)
        .await;
    assert_eq!((s, b["code"].as_str()), (409, Some("ended")));
    let paused = app.create_sale(json!({})).await;
    let paused_id = paused["id"].as_str().unwrap_or_default();
    app.post(
        &format!("/admin/v1/sales/{paused_id}/pause"),
        &json!({}),
        Some(ADMIN_TOKEN),
    )
    .await;
    let (s, b) = app.purchase(paused_id, &token, None, None).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("paused")));
    // The same with an idempotency key (decided by the actor, not the hints).
    let (s, b) = app
        .purchase(paused_id, &token, None, Some("fresh-key"))
        .await;
    assert_eq!((s, b["code"].as_str()), (409, Some("paused")));
    app.post(
        &format!("/admin/v1/sales/{paused_id}/resume"),
        &json!({}),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        app.purchase(paused_id, &token, None, Some("fresh-key"))
            .await
            .0,
        201
    );

    // Stock can grow but never drop below what orders hold.
    let res = app
        .patch(
            &format!("/admin/v1/sales/{live_id}"),
            &json!({"stock_total": 1}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_problem(res, 409, "invalid_transition").await;
    let res = app
        .patch(
            &format!("/admin/v1/sales/{live_id}"),
            &json!({"stock_total": 3}),
            Some(ADMIN_TOKEN),
        )
        .await;
    let grown: Value = res.json().await.unwrap_or_default();
    assert_eq!(
        (grown["stock_left"].as_i64(), grown["status"].as_str()),
        (Some(1), Some("live"))
    );
    assert_eq!(app.purchase(live_id, &t3, None, None).await.0, 201);

    let db = Probe::open(&app.settings).await;
    wait_for_orders(&db, uuid_of(&live["id"]), 3).await;
    assert_eq!(assert_sale_invariants(&db, uuid_of(&live["id"])).await, 3);
    app.teardown().await;
}

async fn a_full_mailbox_is_answered_503_with_retry_after_never_a_hang(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.stock.mailbox_capacity = 1;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 1000, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let users: Vec<(Uuid, String)> = (0..600).map(|_| mint_shopper(&app.settings)).collect();
    let results = join_all(users.iter().map(|(_, token)| {
        let req = app
            .client
            .post(app.url(&format!("/api/v1/sales/{sale_id}/purchases")))
            .bearer_auth(token)
            .send();
        async move {
            let res = req.await.unwrap_or_else(|e| panic!("{e}"));
            let retry = res
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or_default();
            (status, body, retry)
        }
    }))
    .await;
    let mut created = HashSet::new();
    let mut overloaded = 0;
    for (status, body, retry) in &results {
        match status {
            201 => {
                created.insert(uuid_of(&body["id"]));
            }
            503 => {
                assert_eq!(body["code"], "overloaded", "{body}");
                assert_eq!(retry.as_deref(), Some("1"));
                overloaded += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        overloaded > 0,
        "a mailbox of 1 under 600 concurrent buyers must shed some"
    );
    let db = Probe::open(&app.settings).await;
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), created.len()).await;
    assert_eq!(stored, created, "shed purchases reserved nothing");
    let view: Value = app
        .get(&format!("/api/v1/sales/{sale_id}"), None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(
        view["stock_left"].as_u64(),
        Some(1000 - created.len() as u64)
    );
    app.teardown().await;
}

both_modes!(
    a_crowd_buys_exactly_the_stock,
    racing_replays_of_one_idempotency_key_make_one_order,
    an_order_is_visible_to_its_owner_at_once_and_to_no_one_else,
    every_purchase_error_code,
    a_full_mailbox_is_answered_503_with_retry_after_never_a_hang,
);
