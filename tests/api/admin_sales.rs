//! The admin sales API and the public catalogue.

use chrono::{Duration, Utc};
use serde_json::{json, Value};

use crate::helpers::{assert_problem, rfc3339, sale_body, ADMIN_TOKEN};
use crate::helpers::{both_modes, spawn_app_in, Mode};

async fn every_admin_route_requires_the_admin_token(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app.create_sale(json!({})).await;
    let id = sale["id"].as_str().unwrap_or_default();
    let (_, shopper_token) = app.new_shopper().await;
    let routes: Vec<(&str, String)> = vec![
        ("GET", "/admin/v1/sales".into()),
        ("POST", "/admin/v1/sales".into()),
        ("GET", format!("/admin/v1/sales/{id}")),
        ("PATCH", format!("/admin/v1/sales/{id}")),
        ("POST", format!("/admin/v1/sales/{id}/pause")),
        ("POST", format!("/admin/v1/sales/{id}/resume")),
    ];
    for (method, path) in &routes {
        for token in [
            None,
            Some("wrong-token"),
            Some(shopper_token.as_str()),
            Some(""),
        ] {
            let mut req = app
                .client
                .request(method.parse().unwrap_or_default(), app.url(path))
                .json(&sale_body(json!({})));
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let res = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let body = assert_problem(res, 401, "unauthenticated").await;
            assert!(body["detail"].is_string(), "{method} {path}");
        }
    }
    // Nothing changed: the sale is still there, unpaused, as created.
    let res = app
        .get(&format!("/admin/v1/sales/{id}"), Some(ADMIN_TOKEN))
        .await;
    let now: Value = res.json().await.unwrap_or_default();
    assert_eq!(now["paused"], false);
    assert_eq!(now["name"], sale["name"]);
    let list: Value = app
        .get("/admin/v1/sales", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(list["sales"].as_array().map(Vec::len), Some(1));
    app.teardown().await;
}

async fn create_patch_pause_resume_and_statuses(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let now = Utc::now();
    let live = app.create_sale(json!({"stock_total": 7})).await;
    assert_eq!(live["status"], "live");
    assert_eq!(live["stock_left"], 7);
    assert_eq!(live["reserved"], 0);
    let id = live["id"].as_str().unwrap_or_default().to_owned();

    let scheduled = app
        .create_sale(json!({"starts_at": rfc3339(now + Duration::hours(1)), "ends_at": rfc3339(now + Duration::hours(2))}))
        .await;
    assert_eq!(scheduled["status"], "scheduled");
    let ended = app
        .create_sale(json!({"starts_at": rfc3339(now - Duration::hours(2)), "ends_at": rfc3339(now - Duration::hours(1))}))
        .await;
    assert_eq!(ended["status"], "ended");

    // Defaults from config fill what the body leaves out.
    let minimal = app
        .create_sale(json!({"currency": null, "per_user_limit": null, "description": null}))
        .await;
    assert_eq!(minimal["currency"], "USD");
    assert_eq!(minimal["per_user_limit"], 1);
    assert_eq!(minimal["reservation_ttl_secs"], 600);
    assert_eq!(minimal["description"], "");

    // Pause, pause again (harmless), resume.
    let res = app
        .post(
            &format!("/admin/v1/sales/{id}/pause"),
            &json!({}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(res.status(), 200);
    let paused: Value = res.json().await.unwrap_or_default();
    assert_eq!(paused["status"], "paused");
    let public: Value = app
        .get(&format!("/api/v1/sales/{id}"), None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(public["status"], "paused");
    let res = app
        .post(
            &format!("/admin/v1/sales/{id}/pause"),
            &json!({}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .post(
            &format!("/admin/v1/sales/{id}/resume"),
            &json!({}),
            Some(ADMIN_TOKEN),
        )
        .await;
    let resumed: Value = res.json().await.unwrap_or_default();
    assert_eq!(resumed["status"], "live");

    // Patch a few fields; the rest stays.
    let res = app
        .patch(
            &format!("/admin/v1/sales/{id}"),
            &json!({"name": "Renamed", "price_cents": 5}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(res.status(), 200);
    let patched: Value = res.json().await.unwrap_or_default();
    assert_eq!(patched["name"], "Renamed");
    assert_eq!(patched["price_cents"], 5);
    assert_eq!(patched["stock_total"], 7);
    assert_eq!(patched["currency"], "EUR");

    // A started sale keeps its start; an ended one takes no change at all.
    let res = app
        .patch(
            &format!("/admin/v1/sales/{id}"),
            &json!({"starts_at": rfc3339(now + Duration::minutes(5))}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_problem(res, 409, "invalid_transition").await;
    let ended_id = ended["id"].as_str().unwrap_or_default();
    let res = app
        .patch(
            &format!("/admin/v1/sales/{ended_id}"),
            &json!({"name": "x"}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_problem(res, 409, "invalid_transition").await;
    let res = app
        .post(
            &format!("/admin/v1/sales/{ended_id}/pause"),
            &json!({}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_problem(res, 409, "invalid_transition").await;
    // A scheduled sale may move its start.
    let sched_id = scheduled["id"].as_str().unwrap_or_default();
    let res = app
        .patch(
            &format!("/admin/v1/sales/{sched_id}"),
            &json!({"starts_at": rfc3339(now - Duration::seconds(1))}),
            Some(ADMIN_TOKEN),
        )
        .await;
    let moved: Value = res.json().await.unwrap_or_default();
    assert_eq!(moved["status"], "live", "{moved}");

    // The public list carries the server time and every sale.
    let list: Value = app
        .get("/api/v1/sales", None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert!(list["server_time"].is_string());
    assert_eq!(list["sales"].as_array().map(Vec::len), Some(4));
    app.teardown().await;
}

async fn every_validation_rule_names_its_field(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let now = Utc::now();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": ""}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "n".repeat(201)}), "name"),
        (json!({"description": "d".repeat(4001)}), "description"),
        (json!({"price_cents": -1}), "price_cents"),
        (json!({"price_cents": "12"}), "price_cents"),
        (json!({"currency": "eur"}), "currency"),
        (json!({"currency": "EU"}), "currency"),
        (json!({"stock_total": 0}), "stock_total"),
        (json!({"stock_total": 10_000_001}), "stock_total"),
        (json!({"stock_total": 1e30}), "stock_total"),
        (json!({"per_user_limit": 0}), "per_user_limit"),
        (
            json!({"stock_total": 3, "per_user_limit": 4}),
            "per_user_limit",
        ),
        (
            json!({"ends_at": rfc3339(now - Duration::hours(1))}),
            "ends_at",
        ),
        (json!({"starts_at": "yesterday"}), "starts_at"),
        (json!({"reservation_ttl_secs": 0}), "reservation_ttl_secs"),
        (
            json!({"reservation_ttl_secs": 86_401}),
            "reservation_ttl_secs",
        ),
        (json!({"colour": "red"}), "colour"),
    ];
    for (overrides, field) in cases {
        let res = app
            .post(
                "/admin/v1/sales",
                &sale_body(overrides.clone()),
                Some(ADMIN_TOKEN),
            )
            .await;
        let body = assert_problem(res, 422, "invalid_input").await;
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(field), "{overrides}: {detail}");
    }
    // Patches are validated the same way, on the merged result.
    let sale = app.create_sale(json!({"stock_total": 5})).await;
    let id = sale["id"].as_str().unwrap_or_default();
    for (patch, field) in [
        (json!({"per_user_limit": 6}), "per_user_limit"),
        (
            json!({"ends_at": rfc3339(now - Duration::days(1))}),
            "ends_at",
        ),
        (json!({"currency": "usd"}), "currency"),
        (json!({"unknown_key": 1}), "unknown_key"),
    ] {
        let res = app
            .patch(&format!("/admin/v1/sales/{id}"), &patch, Some(ADMIN_TOKEN))
            .await;
        let body = assert_problem(res, 422, "invalid_input").await;
        assert!(
            body["detail"].as_str().unwrap_or_default().contains(field),
            "{patch}: {body}"
        );
    }
    // Nothing was stored by the refused requests.
    let list: Value = app
        .get("/admin/v1/sales", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(list["sales"].as_array().map(Vec::len), Some(1));
    let unchanged: Value = app
        .get(&format!("/admin/v1/sales/{id}"), Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(unchanged["currency"], "EUR");
    app.teardown().await;
}

async fn unknown_and_malformed_sale_ids_are_not_found(mode: Mode) {
    let app = spawn_app_in(mode).await;
    for path in [
        "/api/v1/sales/not-a-uuid".to_owned(),
        format!("/api/v1/sales/{}", uuid::Uuid::new_v4()),
        "/api/v1/sales/%00%ff".to_owned(),
    ] {
        assert_problem(app.get(&path, None).await, 404, "sale_not_found").await;
    }
    for path in [
        "/admin/v1/sales/123".to_owned(),
        format!("/admin/v1/sales/{}", uuid::Uuid::new_v4()),
    ] {
        assert_problem(
            app.get(&path, Some(ADMIN_TOKEN)).await,
            404,
            "sale_not_found",
        )
        .await;
        let res = app
            .post(&format!("{path}/pause"), &json!({}), Some(ADMIN_TOKEN))
            .await;
        assert_problem(res, 404, "sale_not_found").await;
    }
    app.teardown().await;
}

both_modes!(
    every_admin_route_requires_the_admin_token,
    create_patch_pause_resume_and_statuses,
    every_validation_rule_names_its_field,
    unknown_and_malformed_sale_ids_are_not_found,
);
