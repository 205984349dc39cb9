//! Hostile clients against the shipped protections: login floods, refused
//! requests on a kept-alive connection, weak secrets, input PostgreSQL cannot
//! store, and idempotency keys reused with other parameters.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    assert_problem, mint_shopper, rfc3339, spawn_app, spawn_app_with, test_settings, wait_for,
    ADMIN_TOKEN,
};

#[actix_web::test]
async fn a_login_flood_is_shed_with_503_not_queued() {
    let mut settings = test_settings();
    // Real work per hash, one hashing thread, two waiting at most.
    settings.auth.argon2_memory_kib = 8192;
    settings.auth.argon2_iterations = 2;
    settings.auth.password_hash_threads = 1;
    settings.auth.password_hash_queue = 2;
    let app = spawn_app_with(settings).await;
    let bodies: Vec<Value> = (0..40)
        .map(|i| json!({"username": format!("nobody{i}"), "password": "password123"}))
        .collect();
    let flood = bodies
        .iter()
        .map(|body| app.post("/api/v1/sessions", body, None));
    let answers = join_all(flood).await;
    let mut shed = 0;
    for res in answers {
        match res.status().as_u16() {
            401 => {}
            503 => {
                assert!(res.headers().contains_key("retry-after"));
                assert_problem(res, 503, "overloaded").await;
                shed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        shed > 0,
        "40 logins at once on one hashing thread: some are shed"
    );
    assert!(shed < 40, "some logins are served");
    app.teardown().await;
}

#[actix_web::test]
async fn logins_are_limited_per_address_and_per_username() {
    let mut settings = test_settings();
    settings.limits.logins_per_ip_per_minute = 4;
    settings.limits.logins_per_username_per_minute = 2;
    settings.limits.trusted_proxies = vec!["127.0.0.1".into()];
    let app = spawn_app_with(settings).await;
    let login = |name: &'static str, from: &'static str| {
        app.client
            .post(app.url("/api/v1/sessions"))
            .header("x-forwarded-for", from)
            .json(&json!({"username": name, "password": "password123"}))
            .send()
    };
    // One username, two tries from anywhere; the third is refused.
    for from in ["203.0.113.1", "203.0.113.2"] {
        let res = login("alice", from).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(res.status(), 401);
    }
    let res = login("alice", "203.0.113.3")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
    // One address, four tries whatever the names; the fifth is refused.
    for name in ["bob", "carol", "dave"] {
        let res = login(name, "203.0.113.1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(res.status(), 401, "{name}");
    }
    let res = login("erin", "203.0.113.1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_problem(res, 429, "rate_limited").await;
    app.teardown().await;
}

/// Sends `requests` (raw HTTP/1.1) on one connection, one after the other,
/// and returns each response head.
async fn on_one_connection(address: &str, requests: &[String]) -> Vec<String> {
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut heads = Vec::new();
    for request in requests {
        stream
            .write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Read one whole response: head, then Content-Length bytes.
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no answer on the kept-alive connection"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(n > 0, "the server closed the connection after {heads:?}");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    heads.push(head.to_owned());
                    break;
                }
            }
        }
    }
    heads
}

fn purchase_request(sale: &str, token: Option<&str>) -> String {
    let body = r#"{"quantity":1}"#;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST /api/v1/sales/{sale}/purchases HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[actix_web::test]
async fn refused_purchases_keep_the_connection_alive() {
    let mut settings = test_settings();
    settings.limits.per_ip_per_second = 1;
    settings.limits.per_ip_burst = 3;
    let app = spawn_app_with(settings).await;
    let sale = app.create_sale(json!({"stock_total": 1})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    // Unauthenticated, then over the address's quota, on one connection.
    let requests: Vec<String> = (0..4)
        .map(|i| purchase_request(sale_id, (i % 2 == 1).then_some(token.as_str())))
        .collect();
    let heads = on_one_connection(&app.address, &requests).await;
    let statuses: Vec<&str> = heads
        .iter()
        .map(|h| h.split(' ').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(statuses[0], "401", "{heads:?}");
    assert!(statuses.contains(&"429"), "{heads:?}");
    for head in &heads {
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
    }
    app.teardown().await;
}

#[actix_web::test]
async fn weak_secrets_are_refused_off_loopback() {
    let mut settings = test_settings();
    settings.server.host = "0.0.0.0".into();
    let refused = flashsale::startup::Application::build(settings.clone()).await;
    let message = match refused {
        Ok(_) => panic!("started on 0.0.0.0 with the test's short admin token"),
        Err(e) => e.to_string(),
    };
    assert!(message.contains("auth.admin_token"), "{message}");
    assert!(message.contains("flashsale secrets"), "{message}");
    assert!(
        !message.contains(ADMIN_TOKEN),
        "never the secret itself: {message}"
    );
    crate::helpers::cleanup(&settings).await;
}

#[actix_web::test]
async fn the_webhook_exists_only_with_the_webhook_provider() {
    let app = spawn_app().await;
    let res = app.post("/api/v1/payments/webhook", &json!({}), None).await;
    assert_problem(res, 404, "not_found").await;
    app.teardown().await;
}

#[actix_web::test]
async fn input_postgres_cannot_store_is_refused_with_422() {
    let app = spawn_app().await;
    for path in ["/api/v1/sessions", "/api/v1/users"] {
        let res = app
            .post(
                path,
                &json!({"username": "a\u{0}b", "password": "password123"}),
                None,
            )
            .await;
        let body = assert_problem(res, 422, "invalid_input").await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("username"),
            "{body}"
        );
    }
    let bad_sales = [
        (json!({"description": "nul \u{0} here"}), "description"),
        (json!({"starts_at": "-5000-01-01T00:00:00Z"}), "starts_at"),
        (json!({"ends_at": "+20000-01-01T00:00:00Z"}), "ends_at"),
    ];
    for (overrides, field) in bad_sales {
        let res = app
            .post(
                "/admin/v1/sales",
                &crate::helpers::sale_body(overrides),
                Some(ADMIN_TOKEN),
            )
            .await;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or_default();
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("invalid_input")),
            "{body}"
        );
        assert!(
            body["detail"].as_str().unwrap_or_default().contains(field),
            "{field}: {body}"
        );
    }
    // A patch too.
    let sale = app.create_sale(json!({})).await;
    let id = sale["id"].as_str().unwrap_or_default();
    let res = app
        .patch(
            &format!("/admin/v1/sales/{id}"),
            &json!({"ends_at": rfc3339(chrono::DateTime::<chrono::Utc>::MAX_UTC)}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_problem(res, 422, "invalid_input").await;
    app.teardown().await;
}

#[actix_web::test]
async fn an_idempotency_key_names_one_purchase() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(json!({"stock_total": 10, "per_user_limit": 5}))
        .await;
    let other = app
        .create_sale(json!({"stock_total": 10, "per_user_limit": 5}))
        .await;
    let (sale_id, other_id) = (
        sale["id"].as_str().unwrap_or_default(),
        other["id"].as_str().unwrap_or_default(),
    );
    let (_, token) = mint_shopper(&app.settings);
    let (status, first) = app
        .purchase(sale_id, &token, Some(json!({"quantity": 2})), Some("k1"))
        .await;
    assert_eq!(status, 201, "{first}");
    // The same purchase again: the same order.
    let (status, again) = app
        .purchase(sale_id, &token, Some(json!({"quantity": 2})), Some("k1"))
        .await;
    assert_eq!((status, &again["id"]), (200, &first["id"]), "{again}");
    // Another quantity, or another sale, under the same key: refused.
    for (sale, body) in [
        (sale_id, json!({"quantity": 3})),
        (other_id, json!({"quantity": 2})),
    ] {
        let (status, body) = app.purchase(sale, &token, Some(body), Some("k1")).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["code"], "idempotency_key_reused", "{body}");
    }
    // Another buyer may use the same key freely.
    let (_, someone) = mint_shopper(&app.settings);
    let (status, body) = app
        .purchase(other_id, &someone, Some(json!({"quantity": 1})), Some("k1"))
        .await;
    assert_eq!(status, 201, "{body}");
    // A refused purchase leaves its key free for another one.
    let (status, body) = app
        .purchase(sale_id, &token, Some(json!({"quantity": 4})), Some("k2"))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("limit_reached")),
        "{body}"
    );
    let (status, body) = app
        .purchase(other_id, &token, Some(json!({"quantity": 1})), Some("k2"))
        .await;
    assert_eq!(status, 201, "{body}");
    app.teardown().await;
}

async fn messages_handled(app: &crate::helpers::TestApp, sale: &str) -> u64 {
    let status: Value = app
        .get("/admin/v1/actors", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    status["stock_actors"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["sale_id"] == sale))
        .and_then(|a| a["messages_handled"].as_u64())
        .unwrap_or_else(|| panic!("{status}"))
}

#[actix_web::test]
async fn fresh_keys_on_a_sold_out_sale_never_reach_its_actor() {
    let app = spawn_app().await;
    let sale = app.create_sale(json!({"stock_total": 1})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, winner) = mint_shopper(&app.settings);
    let (status, won) = app.purchase(sale_id, &winner, None, Some("w")).await;
    assert_eq!(status, 201, "{won}");
    let before = messages_handled(&app, sale_id).await;
    for i in 0..50 {
        let (_, token) = mint_shopper(&app.settings);
        let key = format!("random-{i}");
        let (status, body) = app.purchase(sale_id, &token, None, Some(&key)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("sold_out")),
            "{body}"
        );
    }
    assert_eq!(messages_handled(&app, sale_id).await, before);
    // The winner's replay is still answered, sold out or not.
    let (status, again) = app.purchase(sale_id, &winner, None, Some("w")).await;
    assert_eq!((status, &again["id"]), (200, &won["id"]), "{again}");
    app.teardown().await;
}

#[actix_web::test]
async fn a_reservation_keeps_the_price_it_was_made_at() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(json!({"stock_total": 10, "price_cents": 12_900, "currency": "EUR"}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    let (status, order) = app.purchase(sale_id, &token, None, None).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(
        (order["price_cents"].as_i64(), order["currency"].as_str()),
        (Some(12_900), Some("EUR"))
    );
    let res = app
        .patch(
            &format!("/admin/v1/sales/{sale_id}"),
            &json!({"price_cents": 99, "currency": "USD"}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(res.status(), 200);
    let id = order["id"].as_str().unwrap_or_default();
    let (status, paid) = app
        .call(&format!("/api/v1/orders/{id}/payment"), &token)
        .await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(
        (
            paid["status"].as_str(),
            paid["price_cents"].as_i64(),
            paid["currency"].as_str()
        ),
        (Some("paid"), Some(12_900), Some("EUR")),
        "{paid}"
    );
    let (_, other) = mint_shopper(&app.settings);
    let (status, later) = app.purchase(sale_id, &other, None, None).await;
    assert_eq!(status, 201, "{later}");
    assert_eq!(
        (later["price_cents"].as_i64(), later["currency"].as_str()),
        (Some(99), Some("USD"))
    );
    // PostgreSQL keeps each order's own price.
    let db = crate::helpers::db_client(&app.settings).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let rows = db
            .query(
                "SELECT price_cents, currency FROM orders WHERE sale_id = $1 ORDER BY price_cents",
                &[&crate::helpers::uuid_of(&sale["id"])],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let stored: Vec<(Option<i64>, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if stored.len() == 2 {
            assert_eq!(
                stored,
                [
                    (Some(99), Some("USD".to_owned())),
                    (Some(12_900), Some("EUR".to_owned()))
                ]
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stored:?}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    app.teardown().await;
}

#[actix_web::test]
async fn orders_leave_memory_once_postgres_holds_them_and_reads_go_on() {
    let mut settings = test_settings();
    settings.orders.directory_evict_after_secs = 1;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 100, "per_user_limit": 2}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, order) = app.purchase(sale_id, &token, None, None).await;
        assert_eq!(status, 201, "{order}");
        ids.push(order["id"].as_str().unwrap_or_default().to_owned());
    }
    let (status, paid) = app
        .call(&format!("/api/v1/orders/{}/payment", ids[0]), &token)
        .await;
    assert_eq!(status, 200, "{paid}");
    // (The writers may already have stored both orders and told the
    // directory by now, so how many it still holds at this instant is not
    // asserted: only that it empties and reads go on from PostgreSQL.)
    let directory = || async { app.actors_status().await["pipeline"]["directory_orders"].as_u64() };
    wait_for("the directory to empty", || async {
        directory().await == Some(0)
    })
    .await;
    // Read from PostgreSQL now, in their latest states.
    let list: Value = app
        .get("/api/v1/orders", Some(&token))
        .await
        .json()
        .await
        .unwrap_or_default();
    let mut statuses: Vec<(String, String)> = list["orders"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|o| {
                    (
                        o["id"].as_str().unwrap_or_default().to_owned(),
                        o["status"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    statuses.sort();
    let mut expected = vec![
        (ids[0].clone(), "paid".to_owned()),
        (ids[1].clone(), "reserved".to_owned()),
    ];
    expected.sort();
    assert_eq!(statuses, expected);
    let (status, body) = app
        .call(&format!("/api/v1/orders/{}/cancel", ids[1]), &token)
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    app.teardown().await;
}
