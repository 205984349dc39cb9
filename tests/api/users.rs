//! Registration and sessions.

use serde_json::{json, Value};

use crate::helpers::assert_problem;
use crate::helpers::{both_modes, spawn_app_in, Mode};

async fn register_then_log_in(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let res = app.register("alice_01", "correct horse").await;
    assert_eq!(res.status(), 201);
    let user: Value = res.json().await.unwrap_or_default();
    assert_eq!(user["username"], "alice_01");
    assert!(uuid::Uuid::parse_str(user["id"].as_str().unwrap_or_default()).is_ok());

    let res = app
        .post(
            "/api/v1/sessions",
            &json!({"username": "alice_01", "password": "correct horse"}),
            None,
        )
        .await;
    assert_eq!(res.status(), 200);
    let session: Value = res.json().await.unwrap_or_default();
    let token = session["token"].as_str().unwrap_or_default();
    assert_eq!(token.split('.').count(), 3, "a JWT: {session}");
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(session["expires_at"].clone()).unwrap_or_default();
    assert!(expires > chrono::Utc::now());
    // The password is stored hashed, never as given.
    let hash = stored_hash(&app, "alice_01").await;
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));
    app.teardown().await;
}

async fn stored_hash(app: &crate::helpers::TestApp, username: &str) -> String {
    crate::helpers::Probe::open(&app.settings)
        .await
        .password_hash(username)
        .await
}

async fn registration_failures(mode: Mode) {
    let app = spawn_app_in(mode).await;
    assert_eq!(app.register("bob_smith", "password123").await.status(), 201);
    assert_problem(
        app.register("bob_smith", "another-password").await,
        409,
        "username_taken",
    )
    .await;

    let cases = [
        ("ab", "password123", "username"),
        (&"x".repeat(65) as &str, "password123", "username"),
        ("bob smith", "password123", "username"),
        ("bob<script>", "password123", "username"),
        ("carol", "short", "password"),
        ("carol", &"p".repeat(129) as &str, "password"),
    ];
    for (username, password, field) in cases {
        let body =
            assert_problem(app.register(username, password).await, 422, "invalid_input").await;
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.starts_with(field),
            "{username:?}/{password:?}: {detail}"
        );
    }
    // Missing field and wrong types name the field too.
    let res = app
        .post("/api/v1/users", &json!({"username": "dave"}), None)
        .await;
    let body = assert_problem(res, 422, "invalid_input").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("password"),
        "{body}"
    );
    let res = app
        .post(
            "/api/v1/users",
            &json!({"username": 5, "password": "password123"}),
            None,
        )
        .await;
    let body = assert_problem(res, 422, "invalid_input").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with("username"),
        "{body}"
    );
    app.teardown().await;
}

async fn login_failures(mode: Mode) {
    let app = spawn_app_in(mode).await;
    assert_eq!(app.register("erin", "password123").await.status(), 201);
    for (username, password) in [
        ("erin", "password124"),
        ("nobody", "password123"),
        ("erin", ""),
    ] {
        let res = app
            .post(
                "/api/v1/sessions",
                &json!({"username": username, "password": password}),
                None,
            )
            .await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
    app.teardown().await;
}

both_modes!(register_then_log_in, registration_failures, login_failures,);
