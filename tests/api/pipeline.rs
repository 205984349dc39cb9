//! The order pipeline under failure: malformed messages and a broker outage.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    assert_sale_invariants, db_client, held_order_ids, mint_shopper, queue_depth, spawn_app,
    spawn_app_with, test_settings, uuid_of, wait_for_orders, wait_ready, Probe, ADMIN_TOKEN,
};
use crate::proxy::TcpProxy;

async fn publish_raw(settings: &flashsale::config::Settings, payload: &[u8]) {
    let conn = flashsale::persistence::rabbit::connect(&settings.rabbitmq, "test-publisher")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ch = conn
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ch.confirm_select(Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let confirm = ch
        .basic_publish(
            "".into(),
            settings.rabbitmq.queue.as_str().into(),
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(confirm.is_ack());
    let _ = conn.close(200, "done".into()).await;
}

#[actix_web::test]
async fn malformed_messages_are_dead_lettered_and_writing_goes_on() {
    let app = spawn_app().await;
    let sale = app.create_sale(json!({"stock_total": 10})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let dead = app.settings.rabbitmq.dead_letter_queue.clone();
    // A buyer's order made with an idempotency key, stored.
    let (buyer, token) = mint_shopper(&app.settings);
    let (status, first) = app.purchase(sale_id, &token, None, Some("k")).await;
    assert_eq!(status, 201, "{first}");
    let db = Probe::open(&app.settings).await;
    wait_for_orders(&db, uuid_of(&sale["id"]), 1).await;
    // Broken JSON, an unknown schema version, an order for a sale that does
    // not exist, and a second order (another id) for the same buyer and key,
    // which the unique index refuses for ever.
    publish_raw(&app.settings, b"{not json").await;
    publish_raw(&app.settings, br#"{"v":99,"entries":[]}"#).await;
    let ghost = json!({"v": 1, "entries": [{"op": "reserve", "order": {
        "id": Uuid::now_v7(), "sale_id": Uuid::now_v7(), "user_id": Uuid::new_v4(), "quantity": 1,
        "status": "reserved", "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:10:00Z",
        "paid_at": null}}]});
    publish_raw(
        &app.settings,
        &serde_json::to_vec(&ghost).unwrap_or_default(),
    )
    .await;
    let second = json!({"v": 2, "entries": [{"op": "reserve", "order": {
        "id": Uuid::now_v7(), "sale": sale["id"], "user": buyer, "qty": 1, "status": "reserved",
        "created_us": 1_767_225_600_000_000i64, "expires_us": 1_767_226_200_000_000i64,
        "paid_us": null, "closed_us": null, "key": "k", "price": 12_900, "cur": "EUR"}}]});
    publish_raw(
        &app.settings,
        &serde_json::to_vec(&second).unwrap_or_default(),
    )
    .await;

    assert_eq!(
        wait_for_depth(&app.settings, &dead, |d| d >= 4).await,
        4,
        "all four dead-lettered"
    );
    let admin: Value = app
        .get("/admin/v1/actors", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(admin["pipeline"]["writers"]["dead_letters"], 4, "{admin}");
    assert_eq!(
        queue_depth(&app.settings, &app.settings.rabbitmq.queue).await,
        0,
        "nothing loops"
    );

    // The writers keep going.
    let (_, token) = mint_shopper(&app.settings);
    let (status, order) = app.purchase(sale_id, &token, None, None).await;
    assert_eq!(status, 201);
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), 2).await;
    assert!(stored.contains(&uuid_of(&order["id"])));
    app.teardown().await;
}

#[actix_web::test]
async fn a_broker_outage_refuses_purchases_and_recovers_by_itself() {
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let mut settings = test_settings();
    settings.rabbitmq.url =
        secrecy::SecretString::from(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port));
    settings.orders.reconnect_initial_ms = 50;
    settings.orders.reconnect_max_ms = 200;
    settings.orders.retry_initial_ms = 20;
    settings.orders.retry_max_ms = 200;
    settings.orders.confirm_timeout_ms = 3000;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 60, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let sale_uuid = uuid_of(&sale["id"]);
    let mut answered_201: HashSet<Uuid> = HashSet::new();

    let buy_many = |n: usize| {
        let tokens: Vec<String> = (0..n).map(|_| mint_shopper(&app.settings).1).collect();
        let app = &app;
        let sale_id = sale_id.clone();
        async move { join_all(tokens.iter().map(|t| app.purchase(&sale_id, t, None, None))).await }
    };

    for (status, body) in buy_many(5).await {
        assert_eq!(status, 201, "{body}");
        answered_201.insert(uuid_of(&body["id"]));
    }

    // Cut the broker while purchases are in flight: each answer is a 201 or
    // a 503, never anything else, and never a hang.
    let (results, ()) = tokio::join!(buy_many(20), async { proxy.cut() });
    for (status, body) in results {
        match status {
            201 => {
                answered_201.insert(uuid_of(&body["id"]));
            }
            503 => assert_eq!(body["code"], "unavailable", "{body}"),
            other => panic!("{other}: {body}"),
        }
    }
    // While it is down: readiness says so, purchases are 503, reads work.
    // The writers may notice the cut before the publisher does (readiness
    // then names them); wait until it names the publisher.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let res = app.get("/readyz", Some(ADMIN_TOKEN)).await;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or_default();
        let names_publisher = body["checks"]["rabbitmq"]
            .as_str()
            .unwrap_or_default()
            .contains("order log is not open");
        if status == 503 && names_publisher {
            assert!(
                body["breakers"]["rabbitmq"]["total_failures"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0,
                "{body}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never noticed the publisher's outage: {status} {body}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    for (status, body) in buy_many(10).await {
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("unavailable")),
            "{body}"
        );
    }
    assert_eq!(
        app.get(&format!("/api/v1/sales/{sale_id}"), None)
            .await
            .status(),
        200
    );

    // Restore: the server comes back by itself.
    proxy.restore();
    assert!(
        wait_ready(&app.client, &app.address, Duration::from_secs(20)).await,
        "never ready again"
    );
    for (status, body) in buy_many(10).await {
        assert_eq!(status, 201, "{body}");
        answered_201.insert(uuid_of(&body["id"]));
    }

    // Every 201 is stored; nothing is left in doubt: the book and
    // PostgreSQL agree on every unit.
    let db = Probe::open(&app.settings).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = held_order_ids(&db, sale_uuid).await;
        let view: Value = app
            .get(&format!("/api/v1/sales/{sale_id}"), None)
            .await
            .json()
            .await
            .unwrap_or_default();
        let left = view["stock_left"].as_u64().unwrap_or(0) as usize;
        if answered_201.is_subset(&stored) && stored.len() + left == 60 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "201s stored: {}/{}; held {} + left {left} != 60",
            answered_201.intersection(&stored).count(),
            answered_201.len(),
            stored.len()
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_sale_invariants(&db, sale_uuid).await;
    app.teardown().await;
}

/// Waits (up to 15 s) until `queue`'s depth satisfies `done`; returns it.
async fn wait_for_depth(
    settings: &flashsale::config::Settings,
    queue: &str,
    done: impl Fn(u32) -> bool,
) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let depth = queue_depth(settings, queue).await;
        if done(depth) || std::time::Instant::now() > deadline {
            return depth;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn actor_status(app: &crate::helpers::TestApp) -> Value {
    app.get("/admin/v1/actors", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default()
}

/// An order-log message with one entry (`reserve` or `transition`).
fn log_message(op: &str, order: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "entries": [{"op": op, "order": order}]}))
        .unwrap_or_default()
}

fn order_json(id: Uuid, sale: Uuid, status: &str) -> Value {
    json!({
        "id": id, "sale_id": sale, "user_id": Uuid::new_v4(), "quantity": 1,
        "status": status, "created_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-01T00:10:00Z",
        "paid_at": if status == "paid" { json!("2026-01-01T00:01:00Z") } else { Value::Null },
    })
}

async fn order_status(db: &Probe, id: Uuid) -> Option<String> {
    db.order_status(id).await
}

async fn wait_for_status(db: &Probe, id: Uuid, status: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = order_status(db, id).await;
        if now.as_deref() == Some(status) || std::time::Instant::now() > deadline {
            return now;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_bad_message_held_with_good_ones_is_dead_lettered_alone() {
    // One writer, so that the messages published while it is blocked reach
    // it together and are written as one set.
    let mut settings = test_settings();
    settings.orders.writers = 1;
    let app = spawn_app_with(settings).await;
    let sale = uuid_of(&app.create_sale(json!({"stock_total": 10})).await["id"]);
    let dead = app.settings.rabbitmq.dead_letter_queue.clone();
    let queue = app.settings.rabbitmq.queue.clone();
    let (first, good, paid) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());

    let locker = db_client(&app.settings).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    publish_raw(
        &app.settings,
        &log_message("reserve", &order_json(first, sale, "reserved")),
    )
    .await;
    publish_raw(
        &app.settings,
        &log_message(
            "reserve",
            &order_json(Uuid::now_v7(), Uuid::now_v7(), "reserved"),
        ),
    )
    .await;
    publish_raw(
        &app.settings,
        &log_message("reserve", &order_json(good, sale, "reserved")),
    )
    .await;
    publish_raw(
        &app.settings,
        &log_message("reserve", &order_json(paid, sale, "reserved")),
    )
    .await;
    publish_raw(
        &app.settings,
        &log_message("transition", &order_json(paid, sale, "paid")),
    )
    .await;
    // Every message is with the writer (none ready in the queue) before the
    // lock goes.
    wait_for_depth(&app.settings, &queue, |d| d == 0).await;
    locker
        .batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let db = Probe::open(&app.settings).await;
    assert_eq!(
        wait_for_status(&db, first, "reserved").await.as_deref(),
        Some("reserved")
    );
    assert_eq!(
        wait_for_status(&db, good, "reserved").await.as_deref(),
        Some("reserved")
    );
    assert_eq!(
        wait_for_status(&db, paid, "paid").await.as_deref(),
        Some("paid")
    );
    assert_eq!(
        wait_for_depth(&app.settings, &dead, |d| d >= 1).await,
        1,
        "only the message naming no sale"
    );
    let stats = actor_status(&app).await;
    assert_eq!(
        stats["pipeline"]["writers"]["dead_letters"].as_u64(),
        Some(1),
        "{stats}"
    );
    app.teardown().await;
}

#[actix_web::test]
async fn log_entries_apply_in_any_order_and_replays_change_nothing() {
    let app = spawn_app().await;
    let sale = uuid_of(&app.create_sale(json!({"stock_total": 10})).await["id"]);
    let db = Probe::open(&app.settings).await;

    // A payment that reaches PostgreSQL before its reservation still wins.
    let id = Uuid::now_v7();
    publish_raw(
        &app.settings,
        &log_message("transition", &order_json(id, sale, "paid")),
    )
    .await;
    assert_eq!(
        wait_for_status(&db, id, "paid").await.as_deref(),
        Some("paid")
    );
    publish_raw(
        &app.settings,
        &log_message("reserve", &order_json(id, sale, "reserved")),
    )
    .await;

    // A reservation applied twice, then cancelled, then replayed again.
    let other = Uuid::now_v7();
    let reserve = log_message("reserve", &order_json(other, sale, "reserved"));
    publish_raw(&app.settings, &reserve).await;
    publish_raw(&app.settings, &reserve).await;
    publish_raw(
        &app.settings,
        &log_message("transition", &order_json(other, sale, "cancelled")),
    )
    .await;
    assert_eq!(
        wait_for_status(&db, other, "cancelled").await.as_deref(),
        Some("cancelled")
    );
    publish_raw(&app.settings, &reserve).await;

    wait_for_depth(&app.settings, &app.settings.rabbitmq.queue, |d| d == 0).await;
    // The last replay has been written (or is being written): give the
    // writer's in-flight delivery time to land, then look.
    let stats_deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let stats = actor_status(&app).await;
        let written = stats["pipeline"]["writers"]["messages_written"]
            .as_u64()
            .unwrap_or(0);
        if written >= 6 || std::time::Instant::now() > stats_deadline {
            assert_eq!(written, 6, "{stats}");
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(order_status(&db, id).await.as_deref(), Some("paid"));
    assert_eq!(order_status(&db, other).await.as_deref(), Some("cancelled"));
    app.teardown().await;
}

#[actix_web::test]
async fn a_writer_gathers_the_messages_of_its_wait_into_one_write() {
    // One writer that waits a second after its first message: the three
    // messages published meanwhile share one statement and commit.
    let mut settings = test_settings();
    settings.orders.writers = 1;
    settings.orders.writer_gather_ms = 1000;
    let app = spawn_app_with(settings).await;
    let sale = uuid_of(&app.create_sale(json!({"stock_total": 10})).await["id"]);
    let db = Probe::open(&app.settings).await;
    let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    for id in ids {
        publish_raw(
            &app.settings,
            &log_message("reserve", &order_json(id, sale, "reserved")),
        )
        .await;
    }
    for id in ids {
        assert_eq!(
            wait_for_status(&db, id, "reserved").await.as_deref(),
            Some("reserved")
        );
    }
    // The counters follow the commit by the ack's round trip.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let writers = loop {
        let writers = actor_status(&app).await["pipeline"]["writers"].clone();
        if writers["messages_written"].as_u64() >= Some(3) || std::time::Instant::now() > deadline {
            break writers;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(writers["messages_written"].as_u64(), Some(3), "{writers}");
    assert_eq!(writers["writes"].as_u64(), Some(1), "{writers}");
    app.teardown().await;
}
