//! `/metrics`, `/admin/v1/actors` and the shipped Grafana dashboard.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{assert_problem, mint_shopper, spawn_app, TestApp, ADMIN_TOKEN};

/// Parses the text exposition: every sample line is `name{labels} value`.
/// Returns samples keyed by `name{labels}`.
fn parse(text: &str) -> HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

async fn scrape(app: &TestApp) -> (String, HashMap<String, f64>) {
    let res = app.get("/metrics", None).await;
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = res.text().await.unwrap_or_default();
    let samples = parse(&text);
    (text, samples)
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[actix_web::test]
async fn metrics_move_with_purchases_rejections_and_dead_letters() {
    let app = spawn_app().await;
    let sale = app.create_sale(json!({"stock_total": 3})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let (_, before) = scrape(&app).await;
    for _ in 0..5 {
        let (_, token) = mint_shopper(&app.settings);
        app.purchase(&sale_id, &token, None, None).await;
    }
    // A dead letter.
    let conn = flashsale::persistence::rabbit::connect(&app.settings.rabbitmq, "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ch = conn
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ch.basic_publish(
        "".into(),
        app.settings.rabbitmq.queue.as_str().into(),
        Default::default(),
        b"garbage",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = conn.close(200, "done".into()).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (_, after) = scrape(&app).await;
        if value(&after, "flashsale_order_writer_dead_letters_total") >= 1.0
            && value(&after, "flashsale_order_writer_rows_total") >= 3.0
        {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dead letter / rows never counted"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    };
    let delta = |s: &str| value(&after, s) - value(&before, s);
    assert_eq!(delta("flashsale_purchases_total{outcome=\"created\"}"), 3.0);
    assert_eq!(
        delta("flashsale_purchases_total{outcome=\"sold_out\"}"),
        2.0
    );
    assert_eq!(
        value(&after, "flashsale_order_writer_dead_letters_total"),
        1.0
    );
    assert_eq!(
        value(
            &after,
            &format!("flashsale_sale_stock_left{{sale_id=\"{sale_id}\"}}")
        ),
        0.0
    );
    assert_eq!(
        value(
            &after,
            &format!("flashsale_sale_units{{sale_id=\"{sale_id}\",status=\"reserved\"}}")
        ),
        3.0
    );
    assert_eq!(
        delta("flashsale_http_requests_total{route=\"/api/v1/sales/{id}/purchases\",method=\"POST\",status=\"201\"}"),
        3.0
    );
    assert!(value(&after, "flashsale_order_log_batch_size_count") >= 1.0);
    assert_eq!(value(&after, "flashsale_order_publisher_connected"), 1.0);
    assert!(value(&after, "flashsale_process_resident_memory_bytes") > 0.0);
    app.teardown().await;
}

#[actix_web::test]
async fn actor_status_reports_a_scripted_sale() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(json!({"stock_total": 10, "name": "Scripted"}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default().to_owned();
    let mut orders = Vec::new();
    for _ in 0..4 {
        let (_, token) = mint_shopper(&app.settings);
        let (status, order) = app.purchase(&sale_id, &token, None, None).await;
        assert_eq!(status, 201);
        orders.push((token, order));
    }
    let pay = format!(
        "/api/v1/orders/{}/payment",
        orders[0].1["id"].as_str().unwrap_or_default()
    );
    assert_eq!(app.call(&pay, &orders[0].0).await.0, 200);
    let cancel = format!(
        "/api/v1/orders/{}/cancel",
        orders[1].1["id"].as_str().unwrap_or_default()
    );
    assert_eq!(app.call(&cancel, &orders[1].0).await.0, 200);

    assert_problem(
        app.get("/admin/v1/actors", None).await,
        401,
        "unauthenticated",
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status: Value = app
            .get("/admin/v1/actors", Some(ADMIN_TOKEN))
            .await
            .json()
            .await
            .unwrap_or_default();
        let actors = status["stock_actors"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(actors.len(), 1);
        let a = &actors[0];
        assert_eq!(a["sale_id"], sale["id"]);
        assert_eq!(a["name"], "Scripted");
        assert_eq!(
            (
                a["stock_left"].as_u64(),
                a["reserved"].as_u64(),
                a["paid"].as_u64(),
                a["cancelled"].as_u64()
            ),
            (Some(7), Some(2), Some(1), Some(1)),
            "{a}"
        );
        assert_eq!(a["mailbox_depth"].as_u64(), Some(0));
        assert!(a["messages_handled"].as_u64().unwrap_or(0) >= 6, "{a}");
        let p = &status["pipeline"];
        assert_eq!(p["publisher"]["connected"], true);
        assert_eq!(
            p["writers"]["pool_size"].as_u64(),
            Some(app.settings.orders.writers as u64)
        );
        assert_eq!(
            p["publisher"]["entries_confirmed"].as_u64(),
            Some(6),
            "4 reservations, 1 payment, 1 cancellation: {p}"
        );
        let written = p["writers"]["rows_written"].as_u64().unwrap_or(0);
        let snapshotted =
            a["snapshot_version"] == a["version"] && a["last_snapshot_at"].is_string();
        if written >= 4 && snapshotted {
            assert_eq!(p["writers"]["dead_letters"].as_u64(), Some(0));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pipeline never caught up: {status}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    app.teardown().await;
}

#[actix_web::test]
async fn every_metric_the_dashboard_queries_exists() {
    let app = spawn_app().await;
    // A sale, so that per-sale series exist.
    app.create_sale(json!({})).await;
    let (_, token) = mint_shopper(&app.settings);
    let sale = app.create_sale(json!({"stock_total": 1})).await;
    app.purchase(sale["id"].as_str().unwrap_or_default(), &token, None, None)
        .await;
    let (text, _) = scrape(&app).await;
    let dashboard: Value =
        serde_json::from_str(include_str!("../../deploy/grafana/flashsale.json"))
            .unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            let expr = target["expr"].as_str().unwrap_or_default().to_owned();
            let mut rest = expr.as_str();
            while let Some(at) = rest.find("flashsale_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(
        queried.len() >= 10,
        "the dashboard queries our metrics: {queried:?}"
    );
    for name in queried {
        let exported = text
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")));
        assert!(
            exported,
            "dashboard queries {name}, which /metrics does not export"
        );
    }
    app.teardown().await;
}
