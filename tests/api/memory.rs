//! Long sales: a settled order leaves the stock actor's book (its buyer's
//! units and its idempotency key stay), and an ended sale's actor stops and
//! starts again when it is needed. Every answer stays what it was.

use chrono::{Duration, Utc};
use serde_json::{json, Value};

use crate::helpers::{
    assert_counters_match, assert_problem, mint_shopper, rfc3339, spawn_app_with, wait_for,
    TestApp, ADMIN_TOKEN,
};
use crate::helpers::{both_modes, test_settings_in, Mode};

/// The admin status of one stock actor.
async fn actor(app: &TestApp, sale_id: &str) -> Value {
    app.actors_status().await["stock_actors"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["sale_id"] == sale_id).cloned())
        .unwrap_or_default()
}

fn order_path(order: &Value, action: &str) -> String {
    format!(
        "/api/v1/orders/{}/{action}",
        order["id"].as_str().unwrap_or_default()
    )
}

async fn settled_orders_leave_the_book_and_every_answer_stays_the_same(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.orders.directory_evict_after_secs = 1;
    let app = spawn_app_with(settings).await;
    let sale = app
        .create_sale(json!({"stock_total": 10, "per_user_limit": 2}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    let (status, paid) = app.purchase(sale_id, &token, None, Some("k1")).await;
    assert_eq!(status, 201, "{paid}");
    assert_eq!(app.call(&order_path(&paid, "payment"), &token).await.0, 200);
    let (status, cancelled) = app.purchase(sale_id, &token, None, Some("k2")).await;
    assert_eq!(status, 201, "{cancelled}");
    assert_eq!(
        app.call(&order_path(&cancelled, "cancel"), &token).await.0,
        200
    );
    // Both are settled: the book keeps neither whole, and once PostgreSQL
    // holds them the directory forgets them too.
    wait_for("the book and the directory to let go", || async {
        let a = actor(&app, sale_id).await;
        let status = app.actors_status().await;
        a["orders_in_play"] == 0 && status["pipeline"]["directory_orders"] == 0
    })
    .await;
    // Replays answer the orders as PostgreSQL holds them.
    let (status, again) = app.purchase(sale_id, &token, None, Some("k1")).await;
    assert_eq!(
        (status, &again["id"], again["status"].as_str()),
        (200, &paid["id"], Some("paid"))
    );
    let (status, again) = app.purchase(sale_id, &token, None, Some("k2")).await;
    assert_eq!(
        (status, &again["id"], again["status"].as_str()),
        (200, &cancelled["id"], Some("cancelled"))
    );
    let (status, reused) = app
        .purchase(sale_id, &token, Some(json!({"quantity": 2})), Some("k1"))
        .await;
    assert_eq!(
        (status, reused["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    // Actions on settled orders: the same state again is harmless, any
    // other change is refused, as before.
    let (status, repaid) = app.call(&order_path(&paid, "payment"), &token).await;
    assert_eq!(
        (status, repaid["status"].as_str()),
        (200, Some("paid")),
        "{repaid}"
    );
    let res = app
        .post(&order_path(&paid, "cancel"), &json!({}), Some(&token))
        .await;
    assert_problem(res, 409, "order_paid").await;
    let (status, recancelled) = app.call(&order_path(&cancelled, "cancel"), &token).await;
    assert_eq!(
        (status, recancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    let res = app
        .post(&order_path(&cancelled, "payment"), &json!({}), Some(&token))
        .await;
    assert_problem(res, 409, "order_cancelled").await;
    // The paid unit still counts against the buyer's limit.
    let (status, over) = app
        .purchase(sale_id, &token, Some(json!({"quantity": 2})), None)
        .await;
    assert_eq!(
        (status, over["code"].as_str()),
        (409, Some("limit_reached"))
    );
    let (status, one) = app.purchase(sale_id, &token, None, None).await;
    assert_eq!(status, 201, "{one}");
    let view = assert_counters_match(&app, sale_id).await;
    assert_eq!(
        (
            view["paid"].as_i64(),
            view["cancelled"].as_i64(),
            view["reserved"].as_i64()
        ),
        (Some(1), Some(1), Some(1))
    );
    app.teardown().await;
}

async fn an_ended_sales_actor_stops_and_starts_again_when_needed(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.stock.idle_stop_after_secs = 1;
    let app = spawn_app_with(settings).await;
    let now = Utc::now();
    let sale = app
        .create_sale(json!({
            "stock_total": 5,
            "starts_at": rfc3339(now - Duration::seconds(5)),
            "ends_at": rfc3339(now + Duration::seconds(2)),
        }))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let (_, token) = mint_shopper(&app.settings);
    let (status, order) = app.purchase(sale_id, &token, None, Some("k")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(
        app.call(&order_path(&order, "payment"), &token).await.0,
        200
    );
    assert_eq!(actor(&app, sale_id).await["running"], true);
    wait_for("the ended sale's actor to stop", || async {
        actor(&app, sale_id).await["running"] == false
    })
    .await;
    // Reads and the hot "no" need no actor.
    let (_, other) = mint_shopper(&app.settings);
    let (status, ended) = app.purchase(sale_id, &other, None, None).await;
    assert_eq!((status, ended["code"].as_str()), (409, Some("ended")));
    let view = assert_counters_match(&app, sale_id).await;
    assert_eq!(
        (view["paid"].as_i64(), view["stock_left"].as_i64()),
        (Some(1), Some(4))
    );
    assert_eq!(actor(&app, sale_id).await["running"], false);
    // A replay needs the actor: it starts again, its book read back.
    let (status, again) = app.purchase(sale_id, &token, None, Some("k")).await;
    assert_eq!(
        (status, &again["id"], again["status"].as_str()),
        (200, &order["id"], Some("paid")),
        "{again}"
    );
    let a = actor(&app, sale_id).await;
    assert_eq!(
        (a["running"].as_bool(), a["stock_left"].as_u64()),
        (Some(true), Some(4))
    );
    // It stops again once idle, and an admin change starts it again.
    wait_for("the actor to stop again", || async {
        actor(&app, sale_id).await["running"] == false
    })
    .await;
    let res = app
        .patch(
            &format!("/admin/v1/sales/{sale_id}"),
            &json!({"name": "Archived sneakers"}),
            Some(ADMIN_TOKEN),
        )
        .await;
    // The actor decides it (an ended sale takes no edit), as before it stopped.
    assert_problem(res, 409, "invalid_transition").await;
    assert_eq!(actor(&app, sale_id).await["running"], true);
    assert_counters_match(&app, sale_id).await;
    app.teardown().await;
}

both_modes!(
    settled_orders_leave_the_book_and_every_answer_stays_the_same,
    an_ended_sales_actor_stops_and_starts_again_when_needed,
);
