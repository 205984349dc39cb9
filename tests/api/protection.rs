//! Protection: rate limits, degraded modes behind cut connections, bursts
//! far above capacity, and hostile input.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::{
    assert_problem, assert_sale_invariants, mint_shopper, spawn_app_with, uuid_of, wait_for,
    wait_for_orders, TestApp, ADMIN_TOKEN,
};
use crate::helpers::{both_modes, spawn_app_in, test_settings_in, Mode, Probe};
use crate::proxy::TcpProxy;

async fn get_with(app: &TestApp, path: &str, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url(path));
    if let Some(f) = forwarded_for {
        req = req.header("x-forwarded-for", f);
    }
    req.send().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn the_ip_quota_holds_says_when_to_retry_and_resets(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.limits.per_ip_per_second = 5;
    settings.limits.per_ip_burst = 5;
    let app = spawn_app_with(settings).await;
    for _ in 0..5 {
        assert_eq!(get_with(&app, "/api/v1/sales", None).await.status(), 200);
    }
    let res = get_with(&app, "/api/v1/sales", None).await;
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_problem(res, 429, "rate_limited").await;
    // Health, readiness and metrics are never limited.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get_with(&app, path, None).await.status(), 200, "{path}");
    }
    actix_web::rt::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get_with(&app, "/api/v1/sales", None).await.status(),
        200,
        "the quota refills"
    );
    app.teardown().await;
}

async fn forwarded_for_counts_only_from_a_trusted_proxy(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.limits.per_ip_per_second = 2;
    settings.limits.per_ip_burst = 2;
    settings.limits.trusted_proxies = vec!["127.0.0.1".into()];
    let app = spawn_app_with(settings).await;
    for _ in 0..2 {
        assert_eq!(
            get_with(&app, "/api/v1/sales", Some("203.0.113.7"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        get_with(&app, "/api/v1/sales", Some("203.0.113.7"))
            .await
            .status(),
        429
    );
    // Another client behind the same proxy has its own quota.
    assert_eq!(
        get_with(&app, "/api/v1/sales", Some("203.0.113.8"))
            .await
            .status(),
        200
    );
    app.teardown().await;

    let mut settings = test_settings_in(mode);
    settings.limits.per_ip_per_second = 2;
    settings.limits.per_ip_burst = 2;
    let app = spawn_app_with(settings).await;
    for _ in 0..2 {
        assert_eq!(
            get_with(&app, "/api/v1/sales", Some("203.0.113.7"))
                .await
                .status(),
            200
        );
    }
    // Untrusted peer: the header is ignored; the peer is out of quota whatever it claims.
    assert_eq!(
        get_with(&app, "/api/v1/sales", Some("203.0.113.8"))
            .await
            .status(),
        429
    );
    app.teardown().await;
}

async fn the_per_user_purchase_quota_holds(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.limits.purchases_per_user_per_second = 1;
    settings.limits.purchases_per_user_burst = 2;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 10, "per_user_limit": 10}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    assert_eq!(app.purchase(sale_id, &token, None, None).await.0, 201);
    assert_eq!(app.purchase(sale_id, &token, None, None).await.0, 201);
    let (status, body) = app.purchase(sale_id, &token, None, None).await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    let (_, other) = mint_shopper(&app.settings);
    assert_eq!(
        app.purchase(sale_id, &other, None, None).await.0,
        201,
        "others are not affected"
    );
    let view = app.admin_sale(sale_id).await;
    assert_eq!(
        view["reserved"].as_i64(),
        Some(3),
        "a refused attempt reserved nothing"
    );
    app.teardown().await;
}

/// `/readyz` as an admin sees it (with the error texts).
async fn readiness(app: &TestApp) -> (u16, Value) {
    let res = app.get("/readyz", Some(ADMIN_TOKEN)).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or_default())
}

#[actix_web::test]
async fn redis_down_pauses_snapshots_and_nothing_else() {
    let proxy = TcpProxy::start("127.0.0.1:6379").await;
    let mut settings = test_settings_in(Mode::Services);
    settings.redis.url = secrecy::SecretString::from(format!("redis://127.0.0.1:{}", proxy.port));
    settings.redis.connect_timeout_ms = 300;
    settings.breakers.open_ms = 200;
    let app = spawn_app_with(settings).await;
    let sale = app.create_sale(json!({"stock_total": 20})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    proxy.cut();
    let mut created = HashSet::new();
    for _ in 0..5 {
        let (_, token) = mint_shopper(&app.settings);
        let (status, order) = app.purchase(&sale_id, &token, None, None).await;
        assert_eq!(status, 201, "purchases go on without Redis: {order}");
        created.insert(uuid_of(&order["id"]));
    }
    wait_for("the redis breaker to open", || async {
        let (status, body) = readiness(&app).await;
        status == 200
            && body["status"] == "degraded"
            && body["breakers"]["redis"]["state"] == "open"
    })
    .await;
    let status: Value = app
        .get("/admin/v1/actors", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert!(
        status["stock_actors"][0]["snapshot_failures"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{status}"
    );
    assert_eq!(status["pipeline"]["breakers"]["redis"]["state"], "open");
    // The trip shows in /metrics too (2 = open).
    let metrics = app
        .get("/metrics", None)
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics
            .lines()
            .any(|l| l == "flashsale_circuit_breaker_state{dependency=\"redis\"} 2"),
        "breaker state not in /metrics"
    );
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("flashsale_redis_snapshot_failures_total ") && !l.ends_with(" 0")));

    proxy.restore();
    wait_for("snapshots to catch up", || async {
        let s: Value = app
            .get("/admin/v1/actors", Some(ADMIN_TOKEN))
            .await
            .json()
            .await
            .unwrap_or_default();
        let a = &s["stock_actors"][0];
        a["snapshot_version"] == a["version"]
            && s["pipeline"]["breakers"]["redis"]["state"] == "closed"
    })
    .await;
    // Readiness reuses its last look at the services for a moment.
    wait_for("readiness to recover", || async {
        readiness(&app).await.1["status"] == "ready"
    })
    .await;
    let db = Probe::open(&app.settings).await;
    assert_eq!(wait_for_orders(&db, uuid_of(&sale["id"]), 5).await, created);
    app.teardown().await;
}

#[actix_web::test]
async fn postgres_down_buffers_orders_in_rabbitmq_and_catches_up() {
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let mut settings = test_settings_in(Mode::Services);
    let db_name = crate::helpers::db_name(&settings);
    settings.database.url = secrecy::SecretString::from(format!(
        "postgres://postgres@127.0.0.1:{}/{db_name}",
        proxy.port
    ));
    settings.database.connect_timeout_ms = 500;
    settings.orders.retry_initial_ms = 20;
    settings.orders.retry_max_ms = 200;
    settings.breakers.open_ms = 200;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 30, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    proxy.cut();
    let mut created = HashSet::new();
    let mut tokens = Vec::new();
    for _ in 0..10 {
        let (_, token) = mint_shopper(&app.settings);
        let (status, order) = app.purchase(&sale_id, &token, None, None).await;
        assert_eq!(
            status, 201,
            "purchases continue while RabbitMQ buffers: {order}"
        );
        created.insert(uuid_of(&order["id"]));
        tokens.push(token);
    }
    wait_for("readiness to report PostgreSQL", || async {
        let (status, body) = readiness(&app).await;
        status == 200
            && body["status"] == "degraded"
            && body["checks"]["postgres"].as_str().unwrap_or("ok") != "ok"
            && body["breakers"]["postgres"]["total_failures"]
                .as_u64()
                .unwrap_or(0)
                > 0
    })
    .await;
    // Anonymous callers learn that PostgreSQL is away, not what it said.
    let anonymous: Value = app
        .get("/readyz", None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(anonymous["checks"]["postgres"], "error", "{anonymous}");
    assert!(
        anonymous["breakers"]
            .as_object()
            .is_some_and(|all| all.values().all(|b| b["last_error"].is_null())),
        "{anonymous}"
    );
    let (_, admin) = readiness(&app).await;
    assert!(
        admin["checks"]["postgres"]
            .as_str()
            .is_some_and(|c| c.starts_with("error:")),
        "{admin}"
    );
    // Reads that need the database answer 503, never 500; the owner still
    // sees the order made a moment ago (from memory).
    let res = app.get("/api/v1/orders", Some(&tokens[0])).await;
    let status = res.status().as_u16();
    assert!(status == 200 || status == 503, "{status}");
    let one = created.iter().next().copied().unwrap_or_default();
    let res = app
        .get(&format!("/api/v1/orders/{one}"), Some(&tokens[0]))
        .await;
    assert!(res.status().as_u16() == 200 || res.status().as_u16() == 404);

    proxy.restore();
    let db = Probe::open(&app.settings).await;
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), 10).await;
    assert_eq!(
        stored, created,
        "every 201 reached PostgreSQL once it was back"
    );
    wait_for("readiness to recover", || async {
        readiness(&app).await.1["status"] == "ready"
    })
    .await;
    assert_sale_invariants(&db, uuid_of(&sale["id"])).await;
    let s: Value = app
        .get("/admin/v1/actors", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert!(
        s["pipeline"]["writers"]["retries"].as_u64().unwrap_or(0) > 0,
        "the writers retried: {s}"
    );
    assert_eq!(
        s["pipeline"]["writers"]["dead_letters"].as_u64(),
        Some(0),
        "nothing was dead-lettered"
    );
    app.teardown().await;
}

async fn a_burst_far_above_capacity_is_answered_not_dropped(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.stock.mailbox_capacity = 16;
    settings.orders.publish_queue_capacity = 32;
    settings.limits.purchases_per_user_per_second = 2;
    settings.limits.purchases_per_user_burst = 2;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 200, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let buyers: Vec<(Uuid, String)> = (0..500).map(|_| mint_shopper(&app.settings)).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let attempts = (0..3000).map(|i| {
        let (client, url, token) = (
            &client,
            app.url(&format!("/api/v1/sales/{sale_id}/purchases")),
            &buyers[i % buyers.len()].1,
        );
        async move {
            let res = client
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("no answer: {e}"));
            let status = res.status().as_u16();
            let retry = res.headers().contains_key("retry-after");
            let body: Value = res.json().await.unwrap_or_default();
            (status, retry, body)
        }
    });
    let results = join_all(attempts).await;
    let mut created = HashSet::new();
    let mut by_code: std::collections::HashMap<String, usize> = Default::default();
    for (status, retry, body) in &results {
        match status {
            201 => {
                created.insert(uuid_of(&body["id"]));
            }
            409 | 429 | 503 => {
                if *status != 409 {
                    assert!(retry, "{status} carries Retry-After");
                }
                *by_code
                    .entry(body["code"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        by_code.get("rate_limited").copied().unwrap_or(0) > 0,
        "{by_code:?}"
    );
    let db = Probe::open(&app.settings).await;
    let stored = wait_for_orders(&db, uuid_of(&sale["id"]), created.len()).await;
    assert_eq!(stored, created, "{by_code:?}");
    assert_sale_invariants(&db, uuid_of(&sale["id"])).await;
    let view = app.admin_sale(&sale_id).await;
    assert_eq!(
        view["stock_left"].as_u64(),
        Some(200 - created.len() as u64)
    );
    app.teardown().await;
}

fn b64(v: &Value) -> String {
    use std::fmt::Write;
    // base64url without padding, written out to avoid another dependency.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            let _ = out.write_char(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn hostile_tokens_are_refused(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let secret = secrecy::ExposeSecret::expose_secret(&app.settings.auth.jwt_secret).to_owned();
    let now = Utc::now().timestamp();
    let claims = |iss: &str, exp: i64| json!({"sub": Uuid::new_v4(), "iss": iss, "iat": now - 10, "exp": exp});
    let sign = |claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap_or_default()
    };
    let good = sign(&claims("flashsale", now + 600));
    assert_eq!(
        app.get("/api/v1/orders", Some(&good)).await.status(),
        200,
        "control: a good token passes"
    );
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("flashsale", now + 600))
    );
    let mut wrong_sig = good.clone();
    wrong_sig.truncate(good.len() - 4);
    wrong_sig.push_str("AAAA");
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims("flashsale", now + 600),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default();
    for (what, token) in [
        ("alg none", none),
        ("wrong signature", wrong_sig),
        ("expired", sign(&claims("flashsale", now - 60))),
        ("foreign issuer", sign(&claims("evil-corp", now + 600))),
        ("another algorithm", hs512),
        ("not a token", "....".to_owned()),
    ] {
        let res = app.get("/api/v1/orders", Some(&token)).await;
        assert_eq!(res.status(), 401, "{what}");
        assert_problem(res, 401, "unauthenticated").await;
    }
    app.teardown().await;
}

async fn a_remembered_token_is_refused_once_it_expires(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let secret = secrecy::ExposeSecret::expose_secret(&app.settings.auth.jwt_secret).to_owned();
    let now = Utc::now().timestamp();
    let exp = now + 1;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": Uuid::new_v4(), "iss": "flashsale", "iat": now, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default();
    // Verified, then remembered by the worker; more requests are hits.
    for _ in 0..5 {
        assert_eq!(app.get("/api/v1/orders", Some(&token)).await.status(), 200);
    }
    // Past `exp` and the verification leeway (5 s), a remembered token
    // counts for nothing.
    while Utc::now().timestamp() <= exp + 5 {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for _ in 0..5 {
        let res = app.get("/api/v1/orders", Some(&token)).await;
        assert_problem(res, 401, "unauthenticated").await;
    }
    app.teardown().await;
}

async fn huge_headers_and_slow_clients_are_cut_off(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.server.client_request_timeout_ms = 1000;
    let app = spawn_app_with(settings).await;
    // The server closes a connection after refusing its head: send these on
    // connections nobody reuses.
    let once = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    // Headers past the limit: 431 with a problem body.
    let res = once
        .get(app.url("/api/v1/sales"))
        .header(
            "x-filler",
            "a".repeat(app.settings.server.max_header_bytes + 1),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_problem(res, 431, "headers_too_large").await;
    // Far past the HTTP parser's own buffer: refused (4xx or a closed
    // connection), never a 5xx, and the server lives.
    if let Ok(res) = once
        .get(app.url("/api/v1/sales"))
        .header("x-filler", "a".repeat(256 * 1024))
        .send()
        .await
    {
        let status = res.status().as_u16();
        assert!((400..500).contains(&status), "{status}");
    }
    assert_eq!(
        once.get(app.url("/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok(),
        Some(200)
    );

    // A client that sends half a request head and stalls gets 408 and is closed.
    let port = app
        .address
        .rsplit(':')
        .next()
        .unwrap_or("0")
        .parse::<u16>()
        .unwrap_or(0);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    stream
        .write_all(b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the stalled connection was not closed within 5 s"
    );
    let head = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // Still alive (a loaded machine may time a fresh connection out too, so
    // a few tries).
    let mut alive = false;
    for _ in 0..5 {
        if let Ok(r) = once.get(app.url("/healthz")).send().await {
            if r.status() == 200 {
                alive = true;
                break;
            }
        }
    }
    assert!(alive, "the server answers after the slow client");
    app.teardown().await;
}

async fn ids_that_are_not_ids_are_404_on_every_route(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let (_, token) = mint_shopper(&app.settings);
    for path in [
        "/api/v1/sales/%20",
        "/api/v1/sales/1%27%20OR%201=1",
        "/api/v1/orders/..%2f..",
        "/api/v1/orders/00000000-0000-0000-0000-00000000000g",
    ] {
        let status = app.get(path, Some(&token)).await.status().as_u16();
        assert_eq!(status, 404, "{path}");
    }
    for path in [
        "/api/v1/orders/x/payment",
        "/api/v1/orders/x/cancel",
        "/api/v1/sales/x/purchases",
    ] {
        assert_eq!(
            app.post(path, &json!({}), Some(&token)).await.status(),
            404,
            "{path}"
        );
    }
    for path in ["/admin/v1/sales/x", "/admin/v1/sales/x/pause"] {
        let res = if path.ends_with("pause") {
            app.post(path, &json!({}), Some(ADMIN_TOKEN)).await
        } else {
            app.get(path, Some(ADMIN_TOKEN)).await
        };
        assert_eq!(res.status(), 404, "{path}");
    }
    // Nothing was touched.
    let list: Value = app
        .get("/api/v1/orders", Some(&token))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(list["orders"].as_array().map(Vec::len), Some(0));
    app.teardown().await;
}

both_modes!(
    the_ip_quota_holds_says_when_to_retry_and_resets,
    forwarded_for_counts_only_from_a_trusted_proxy,
    the_per_user_purchase_quota_holds,
    a_burst_far_above_capacity_is_answered_not_dropped,
    hostile_tokens_are_refused,
    a_remembered_token_is_refused_once_it_expires,
    huge_headers_and_slow_clients_are_cut_off,
    ids_that_are_not_ids_are_404_on_every_route,
);
