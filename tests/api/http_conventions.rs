//! HTTP conventions that hold on every route: problem answers for bad bodies,
//! request ids, 404/405, readiness and the OpenAPI document.

use serde_json::{json, Value};

use crate::helpers::{assert_problem, sale_body, spawn_app, ADMIN_TOKEN};

#[actix_web::test]
async fn bad_bodies_get_clear_answers_and_change_nothing() {
    let app = spawn_app().await;
    let post_raw = |path: &'static str, ct: Option<&'static str>, body: Vec<u8>| {
        let mut req = app
            .client
            .post(app.url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    let ok = serde_json::to_vec(&sale_body(json!({}))).unwrap_or_default();

    let res = post_raw(
        "/admin/v1/sales",
        Some("application/json"),
        b"{\"name\": ".to_vec(),
    )
    .await;
    assert_problem(res.unwrap_or_else(|e| panic!("{e}")), 400, "malformed_json").await;
    let res = post_raw(
        "/admin/v1/sales",
        Some("application/json"),
        b"[1,2".to_vec(),
    )
    .await;
    assert_problem(res.unwrap_or_else(|e| panic!("{e}")), 400, "malformed_json").await;
    let res = post_raw("/admin/v1/sales", Some("text/plain"), ok.clone()).await;
    assert_problem(
        res.unwrap_or_else(|e| panic!("{e}")),
        415,
        "unsupported_media_type",
    )
    .await;
    let res = post_raw("/admin/v1/sales", None, ok.clone()).await;
    assert_problem(
        res.unwrap_or_else(|e| panic!("{e}")),
        415,
        "unsupported_media_type",
    )
    .await;
    let mut big = sale_body(json!({}));
    big["description"] = json!("x".repeat(app.settings.server.max_body_bytes));
    let res = post_raw(
        "/admin/v1/sales",
        Some("application/json"),
        serde_json::to_vec(&big).unwrap_or_default(),
    )
    .await;
    assert_problem(
        res.unwrap_or_else(|e| panic!("{e}")),
        413,
        "payload_too_large",
    )
    .await;
    // Deeply nested JSON is refused, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let res = post_raw("/api/v1/users", Some("application/json"), deep.into_bytes()).await;
    let status = res.unwrap_or_else(|e| panic!("{e}")).status().as_u16();
    assert!(status == 400 || status == 422, "{status}");
    // A JSON media type with parameters or a +json suffix is fine.
    let res = post_raw(
        "/admin/v1/sales",
        Some("application/json; charset=utf-8"),
        ok.clone(),
    )
    .await;
    assert_eq!(res.unwrap_or_else(|e| panic!("{e}")).status(), 201);

    let list: Value = app
        .get("/admin/v1/sales", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(
        list["sales"].as_array().map(Vec::len),
        Some(1),
        "only the good body was stored"
    );
    // And the server is still up.
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.teardown().await;
}

#[actix_web::test]
async fn request_ids_are_echoed_or_made() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    let a = app.get("/api/v1/sales/nope", None).await;
    let b = app.get("/api/v1/sales/nope", None).await;
    let id_a = a.headers()["x-request-id"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let id_b = b.headers()["x-request-id"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(id_a.len() >= 16 && id_a != id_b, "{id_a} {id_b}");
    // An unreasonable one is replaced.
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(res.headers()["x-request-id"].len(), 500);
    app.teardown().await;
}

#[actix_web::test]
async fn unknown_routes_and_methods() {
    let app = spawn_app().await;
    assert_problem(app.get("/nope", None).await, 404, "not_found").await;
    assert_problem(app.get("/api/v1/nope", None).await, 404, "not_found").await;
    assert_problem(
        app.post("/healthz", &json!({}), None).await,
        405,
        "method_not_allowed",
    )
    .await;
    assert_problem(
        app.get("/api/v1/users", None).await,
        405,
        "method_not_allowed",
    )
    .await;
    app.teardown().await;
}

#[actix_web::test]
async fn readiness_checks_every_service() {
    let app = spawn_app().await;
    let res = app.get("/readyz", None).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(body["status"], "ready");
    for check in ["postgres", "redis", "rabbitmq", "recovery"] {
        assert_eq!(body["checks"][check], "ok", "{body}");
    }
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.teardown().await;
}

#[actix_web::test]
async fn openapi_document_lists_the_routes() {
    let app = spawn_app().await;
    let doc: Value = app
        .get("/openapi.json", None)
        .await
        .json()
        .await
        .unwrap_or_default();
    assert!(doc["openapi"]
        .as_str()
        .unwrap_or_default()
        .starts_with("3."));
    for path in [
        "/api/v1/users",
        "/api/v1/sessions",
        "/api/v1/sales",
        "/api/v1/sales/{id}",
        "/admin/v1/sales",
        "/admin/v1/sales/{id}",
        "/admin/v1/sales/{id}/pause",
        "/admin/v1/sales/{id}/resume",
        "/healthz",
        "/readyz",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    app.teardown().await;
}
