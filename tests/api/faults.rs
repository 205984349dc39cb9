//! The promises under faults the happy-path tests never meet: a restart
//! whose order log takes longer to drain than any deadline, a broker cut
//! while payments, cancellations and expiries are in flight, PostgreSQL away
//! with a reservation in doubt, a stalled database under an admin change,
//! SIGTERM with PostgreSQL down, and (embedded mode) the SQLite file locked
//! by another process mid-load.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    assert_counters_match, assert_sale_invariants, cleanup, db_client, held_order_ids,
    mint_shopper, spawn_app_with, test_settings, test_settings_in, uuid_of, wait_for,
    wait_for_orders, wait_ready, Mode, Probe, ServerProcess, StoreLock, ADMIN_TOKEN,
};
use crate::proxy::TcpProxy;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn json_of(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or_default())
}

async fn buy(
    client: &reqwest::Client,
    base: &str,
    sale: Uuid,
    token: &str,
    key: Option<&str>,
) -> (u16, Value) {
    let mut req = client
        .post(format!("{base}/api/v1/sales/{sale}/purchases"))
        .bearer_auth(token);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    json_of(req.send().await.unwrap_or_else(|e| panic!("purchase: {e}"))).await
}

/// Polls until `/readyz` answers 503 with code `recovering` (bounded).
async fn wait_recovering(client: &reqwest::Client, base: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(res) = client.get(format!("{base}/readyz")).send().await {
            let (status, body) = json_of(res).await;
            if status == 503 && body["code"] == "recovering" {
                return body;
            }
            assert!(status != 200, "ready before the log was drained: {body}");
        }
        assert!(Instant::now() < deadline, "never answered `recovering`");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_restart_keeps_every_sale_closed_until_the_whole_log_is_in_postgres() {
    let settings = test_settings();
    let client = client();
    let mut server = ServerProcess::start(&settings, &client).await;
    let sale_id = server
        .create_sale(&client, json!({"stock_total": 5, "per_user_limit": 1}))
        .await;

    // The writers are held back: every 201 below waits in RabbitMQ only.
    let locker = db_client(&settings).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let buyers: Vec<(Uuid, String)> = (0..5).map(|_| mint_shopper(&settings)).collect();
    let mut sold = Vec::new();
    for (_, token) in &buyers {
        let (status, body) = buy(&client, &server.base, sale_id, token, Some("k")).await;
        assert_eq!(status, 201, "{body}");
        sold.push(uuid_of(&body["id"]));
    }
    server.kill().await;

    // Restart with a drain warning far shorter than the drain will take.
    let mut server = ServerProcess::spawn(
        &settings,
        &[("FLASHSALE__ORDERS__RECOVERY_DRAIN_WARN_SECS", "1")],
    );
    wait_recovering(&client, &server.base).await;
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    // Past the warning: still closed. Reads work; every decision is 503.
    let body = wait_recovering(&client, &server.base).await;
    assert!(
        body["checks"]["recovery"]
            .as_str()
            .is_some_and(|c| c.contains("left to drain")),
        "{body}"
    );
    let (status, view) = json_of(
        client
            .get(format!("{}/api/v1/sales/{sale_id}", server.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    assert_eq!(status, 200, "reads work while recovering: {view}");
    let newcomer = mint_shopper(&settings).1;
    for (token, key) in [
        (&newcomer, None),
        (&buyers[0].1, Some("k")),
        (&buyers[1].1, None),
    ] {
        let res = client
            .post(format!("{}/api/v1/sales/{sale_id}/purchases", server.base))
            .bearer_auth(token);
        let res = match key {
            Some(k) => res.header("idempotency-key", k),
            None => res,
        };
        let res = res.send().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(res.headers().contains_key("retry-after"));
        let (status, body) = json_of(res).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "unavailable", "{body}");
    }
    let (status, body) = json_of(
        client
            .post(format!("{}/admin/v1/sales/{sale_id}/pause", server.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    assert_eq!(status, 503, "admin changes wait for recovery too: {body}");

    // The database comes back: the drain finishes, the sales open.
    locker
        .batch_execute("ROLLBACK")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(wait_ready(&client, &server.base, Duration::from_secs(60)).await);
    let db = Probe::open(&settings).await;
    let stored = held_order_ids(&db, sale_id).await;
    assert!(
        sold.iter().all(|id| stored.contains(id)),
        "every 201 is stored"
    );
    assert_eq!(assert_sale_invariants(&db, sale_id).await, 5);
    // Sold out for a newcomer; a buyer who holds a unit is refused; the same
    // key gives the same order back, never a second one.
    let (status, body) = buy(&client, &server.base, sale_id, &newcomer, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("sold_out")),
        "{body}"
    );
    let (status, body) = buy(&client, &server.base, sale_id, &buyers[0].1, Some("k")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(uuid_of(&body["id"]), sold[0]);
    let (status, body) = buy(&client, &server.base, sale_id, &buyers[1].1, Some("k2")).await;
    assert_eq!(status, 409, "{body}");
    let orders = db
        .orders(sale_id)
        .await
        .iter()
        .filter(|o| o.status != "void")
        .count();
    assert_eq!(orders, 5);
    // No writer is stuck: a graceful stop ends promptly and cleanly.
    server.signal("TERM");
    let exit = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .unwrap_or_else(|_| panic!("SIGTERM did not stop the server"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(exit.success(), "{exit:?}");
    cleanup(&settings).await;
}

/// Settings for an app whose RabbitMQ goes through `proxy`, reconnecting fast.
fn broker_behind(proxy: &TcpProxy) -> flashsale::config::Settings {
    let mut settings = test_settings();
    settings.rabbitmq.url =
        secrecy::SecretString::from(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port));
    settings.orders.reconnect_initial_ms = 50;
    settings.orders.reconnect_max_ms = 200;
    settings.orders.retry_initial_ms = 20;
    settings.orders.retry_max_ms = 200;
    settings
}

#[actix_web::test]
async fn a_broker_cut_loses_no_payment_cancellation_or_expiry() {
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let mut settings = broker_behind(&proxy);
    // One batch in flight at a time: while the broker stalls, the next
    // decisions wait in the publisher's queue, never handed to the broker.
    settings.orders.max_unconfirmed_batches = 1;
    settings.orders.confirm_timeout_ms = 15_000;
    settings.stock.expiry_tick_ms = 50;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 40, "per_user_limit": 1, "reservation_ttl_secs": 3}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let buyers: Vec<String> = (0..40).map(|_| mint_shopper(&app.settings).1).collect();
    let mut orders = Vec::new();
    for token in &buyers {
        let (status, body) = app.purchase(&sale_id, token, None, None).await;
        assert_eq!(status, 201, "{body}");
        orders.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    let reserved_at = Instant::now();

    // The broker stalls, then is cut, while 15 payments and 15 cancellations
    // are decided; the other 10 reservations expire during the outage.
    proxy.stall();
    let paths: Vec<String> = (0..30)
        .map(|i| {
            let action = if i % 2 == 0 { "payment" } else { "cancel" };
            format!("/api/v1/orders/{}/{action}", orders[i])
        })
        .collect();
    let decide = paths
        .iter()
        .zip(&buyers)
        .map(|(path, token)| app.call(path, token));
    let cut = async {
        actix_web::rt::time::sleep(Duration::from_millis(400)).await;
        proxy.cut();
    };
    let (answers, ()) = tokio::join!(join_all(decide), cut);
    for (status, body) in &answers {
        assert!(
            *status == 200 || (*status == 503 && body["code"] == "unavailable"),
            "{status}: {body}"
        );
    }
    let ttl_passed = reserved_at + Duration::from_secs(4);
    actix_web::rt::time::sleep_until(ttl_passed.into()).await;
    proxy.restore();

    // The expiries the outage held up go through once the broker is back.
    wait_for("the held-up reservations to expire", || async {
        app.admin_sale(&sale_id).await["expired"] == 10
    })
    .await;
    // Every decision the actor applied is in PostgreSQL, and the stock adds up.
    let view = assert_counters_match(&app, &sale_id).await;
    assert_eq!(view["paid"], 15, "{view}");
    assert_eq!(view["cancelled"], 15, "{view}");
    assert_eq!(view["expired"], 10, "{view}");
    assert_eq!(view["stock_left"], 25, "{view}");
    app.teardown().await;
}

#[actix_web::test]
async fn purchases_go_on_while_a_reservation_in_doubt_waits_for_postgres() {
    let broker = TcpProxy::start("127.0.0.1:5672").await;
    let database = TcpProxy::start("127.0.0.1:5432").await;
    let mut settings = broker_behind(&broker);
    let direct = settings.clone();
    settings.database.url = secrecy::SecretString::from(format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        database.port,
        crate::helpers::db_name(&settings)
    ));
    settings.orders.confirm_timeout_ms = 3000;
    settings.database.connect_timeout_ms = 500;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 100, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();

    // A reservation whose confirm never comes: in doubt, its buyer told 503.
    database.cut();
    broker.stall();
    let doubtful = mint_shopper(&app.settings).1;
    let (pending, ()) = tokio::join!(app.purchase(&sale_id, &doubtful, None, None), async {
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
        broker.cut();
    });
    assert_eq!(pending.0, 503, "{}", pending.1);
    broker.restore();

    // PostgreSQL is still away: new purchases are answered 201 as usual,
    // each within the confirm time-out (the orders wait in RabbitMQ).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sold = Vec::new();
    while sold.len() < 20 {
        let (status, body) = app
            .purchase(&sale_id, &mint_shopper(&app.settings).1, None, None)
            .await;
        match status {
            201 => sold.push(uuid_of(&body["id"])),
            // The publisher may still be reconnecting after the cut.
            503 if sold.is_empty() && Instant::now() < deadline => {
                actix_web::rt::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("{status}: {body}"),
        }
    }
    let admin = app.get("/admin/v1/actors", Some(ADMIN_TOKEN)).await;
    let admin: Value = admin.json().await.unwrap_or_default();
    let in_doubt = admin["pipeline"]["publisher"]["in_doubt"].as_u64();
    assert!(in_doubt.is_some_and(|n| n >= 1), "still in doubt: {admin}");

    // PostgreSQL back: the doubt is decided, the orders land, counts agree.
    database.restore();
    let db = Probe::open(&direct).await;
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), sold.len()).await;
    assert!(sold.iter().all(|id| stored.contains(id)));
    assert_counters_match(&app, &sale_id).await;
    app.teardown().await;
}

#[actix_web::test]
async fn a_stalled_database_answers_a_pause_with_503_and_purchases_go_on() {
    let mut settings = test_settings();
    settings.database.statement_timeout_ms = 500;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 100, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let locker = db_client(&app.settings).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE sales IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The pause and a purchase arrive together; the pause gives up within
    // its deadline and leaves the sale as it was.
    let started = Instant::now();
    let pause = app
        .client
        .post(app.url(&format!("/admin/v1/sales/{sale_id}/pause")))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(10))
        .send();
    let buyer = mint_shopper(&app.settings).1;
    let (paused, bought) = tokio::join!(pause, app.purchase(&sale_id, &buyer, None, None));
    let paused = paused.unwrap_or_else(|e| panic!("the pause hung: {e}"));
    let waited = started.elapsed();
    assert!(paused.headers().contains_key("retry-after"));
    let (status, body) = json_of(paused).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(waited < Duration::from_secs(5), "the pause took {waited:?}");
    assert_eq!(bought.0, 201, "{}", bought.1);
    let view = app.admin_sale(&sale_id).await;
    assert_eq!(view["paused"], false, "{view}");
    assert_eq!(view["status"], "live", "{view}");
    for _ in 0..5 {
        let (status, body) = app
            .purchase(&sale_id, &mint_shopper(&app.settings).1, None, None)
            .await;
        assert_eq!(status, 201, "{body}");
    }

    // The database answers again: the same pause goes through.
    locker
        .batch_execute("ROLLBACK")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = app
        .call(&format!("/admin/v1/sales/{sale_id}/pause"), ADMIN_TOKEN)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true, "{body}");
    app.teardown().await;
}

#[actix_web::test]
async fn sigterm_with_postgres_down_exits_within_the_bound_and_loses_nothing() {
    let database = TcpProxy::start("127.0.0.1:5432").await;
    let mut settings = test_settings();
    let direct = settings.clone();
    settings.database.url = secrecy::SecretString::from(format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        database.port,
        crate::helpers::db_name(&settings)
    ));
    let shutdown_timeout = 2;
    let client = client();
    let server = ServerProcess::spawn(
        &settings,
        &[(
            "FLASHSALE__SERVER__SHUTDOWN_TIMEOUT_SECS",
            &shutdown_timeout.to_string(),
        )],
    );
    assert!(wait_ready(&client, &server.base, Duration::from_secs(60)).await);
    let mut server = server;
    let sale_id = server
        .create_sale(&client, json!({"stock_total": 100, "per_user_limit": 1}))
        .await;
    database.cut();
    // Orders taken while PostgreSQL is away wait in RabbitMQ.
    let mut sold = Vec::new();
    for _ in 0..10 {
        let (status, body) = buy(
            &client,
            &server.base,
            sale_id,
            &mint_shopper(&settings).1,
            None,
        )
        .await;
        assert_eq!(status, 201, "{body}");
        sold.push(uuid_of(&body["id"]));
    }
    let started = Instant::now();
    server.signal("TERM");
    let bound = Duration::from_secs(shutdown_timeout) + flashsale::startup::SHUTDOWN_MARGIN;
    let exit = tokio::time::timeout(bound + Duration::from_secs(3), server.child.wait())
        .await
        .unwrap_or_else(|_| panic!("SIGTERM with PostgreSQL down did not exit within {bound:?}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(exit.success(), "{exit:?} after {:?}", started.elapsed());

    // The next start, with PostgreSQL back, finds every order in RabbitMQ.
    database.restore();
    let mut server = ServerProcess::start(&settings, &client).await;
    let db = Probe::open(&direct).await;
    let stored = held_order_ids(&db, sale_id).await;
    assert!(
        sold.iter().all(|id| stored.contains(id)),
        "every 201 is stored"
    );
    server.kill().await;
    cleanup(&settings).await;
}

/// Embedded mode's fault: another process holds the SQLite file's write
/// lock mid-load. Every purchase meanwhile is answered in bounded time with
/// 503 `unavailable` (never a 500, never a hang), nothing answered 201 is
/// lost, the reservations whose commit failed are decided once the file
/// answers (voided, their units back, their buyers free to buy again), and
/// purchases go on.
#[actix_web::test]
async fn a_locked_sqlite_file_answers_503_then_decides_what_was_in_doubt() {
    let mut settings = test_settings_in(Mode::Embedded);
    settings.storage.busy_timeout_ms = 300;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 1000, "per_user_limit": 1}))
        .await;
    let sale_id = uuid_of(&sale["id"]);
    let client = client();
    let shoppers: Vec<(Uuid, String)> = (0..60).map(|_| mint_shopper(&app.settings)).collect();
    let mut answered = Vec::new();
    for (_, token) in &shoppers[..10] {
        let (status, body) = buy(&client, &app.address, sale_id, token, None).await;
        assert_eq!(status, 201, "{body}");
        answered.push(uuid_of(&body["id"]));
    }

    let lock = StoreLock::take(&app.settings).await;
    let started = Instant::now();
    let during = join_all(
        shoppers[10..40]
            .iter()
            .map(|(_, t)| buy(&client, &app.address, sale_id, t, None)),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answers took {:?}",
        started.elapsed()
    );
    for (status, body) in &during {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["code"], "unavailable", "{body}");
    }
    lock.release().await;

    // Once the file answers, purchases go on; the refused buyers may buy.
    // A refused buyer holds nothing once its reservation is decided.
    let (_, first_refused) = &shoppers[10];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = buy(&client, &app.address, sale_id, first_refused, None).await;
        if status == 201 {
            answered.push(uuid_of(&body["id"]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refused buyer still cannot buy: {status} {body}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, token) in &shoppers[40..] {
        let (status, body) = buy(&client, &app.address, sale_id, token, None).await;
        assert_eq!(status, 201, "{body}");
        answered.push(uuid_of(&body["id"]));
    }
    // What was in doubt is decided: the counters equal the file's and the
    // stock adds up, with every 201 in the file.
    let view = assert_counters_match(&app, &sale_id.to_string()).await;
    let probe = Probe::open(&app.settings).await;
    let stored = held_order_ids(&probe, sale_id).await;
    for id in &answered {
        assert!(
            stored.contains(id),
            "order {id} answered 201 is not in the file"
        );
    }
    assert_eq!(
        view["reserved"].as_u64(),
        Some(stored.len() as u64),
        "{view}"
    );
    let in_doubt = app.actors_status().await["pipeline"]["publisher"]["in_doubt"].as_u64();
    assert_eq!(in_doubt, Some(0));
    app.teardown().await;
}
