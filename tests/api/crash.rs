//! A 201 is a promise, across `kill -9`: the real binary is driven with
//! purchases, killed mid-stream three times, restarted each time, and every
//! order it answered 201 must be in PostgreSQL, with no sale oversold and no
//! buyer over the limit.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::FutureExt;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    assert_sale_invariants, cleanup, db_client, free_port, held_order_ids, mint_shopper, sale_body,
    server_command, test_settings, uuid_of, wait_ready, ADMIN_TOKEN,
};

struct Server {
    child: tokio::process::Child,
    base: String,
}

async fn start(settings: &flashsale::config::Settings, client: &reqwest::Client) -> Server {
    let port = free_port();
    let mut cmd = tokio::process::Command::from(server_command(settings, port));
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn server: {e}"));
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_ready(client, &base, Duration::from_secs(60)).await,
        "server did not become ready"
    );
    Server { child, base }
}

#[actix_web::test]
async fn every_201_survives_sigkill_mid_stream_three_times() {
    let settings = test_settings();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let stock = 400u64;
    let mut server = start(&settings, &client).await;
    let res = client
        .post(format!("{}/admin/v1/sales", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&sale_body(
            json!({"stock_total": stock, "per_user_limit": 1}),
        ))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sale: Value = res.json().await.unwrap_or_default();
    let sale_id = uuid_of(&sale["id"]);
    // More buyers than stock, each trying again and again: after a restart a
    // buyer who already has an order must be refused (limit 1).
    let buyers: Vec<(Uuid, String)> = (0..600).map(|_| mint_shopper(&settings)).collect();
    let answered: RefCell<HashSet<Uuid>> = RefCell::new(HashSet::new());

    for round in 0..3 {
        // In rounds 1 and 2 the writers are held back by a lock on the
        // orders table, so confirmed orders wait in RabbitMQ when the kill
        // comes: exactly the window where other designs lose orders.
        let locker = db_client(&settings).await;
        let held_back = round > 0;
        if held_back {
            locker
                .batch_execute("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let stop = Cell::new(false);
        let round_201 = Cell::new(0usize);
        let base = server.base.clone();
        let drivers = (0..48).map(|w| {
            let (client, base, buyers, stop, answered, round_201) =
                (&client, &base, &buyers, &stop, &answered, &round_201);
            async move {
                let mut i = w;
                while !stop.get() {
                    i = (i + 7) % buyers.len();
                    let sent = client
                        .post(format!("{base}/api/v1/sales/{sale_id}/purchases"))
                        .bearer_auth(&buyers[i].1)
                        .send()
                        .await;
                    let Ok(res) = sent else { continue };
                    if res.status() == 201 {
                        if let Ok(body) = res.json::<Value>().await {
                            answered.borrow_mut().insert(uuid_of(&body["id"]));
                            round_201.set(round_201.get() + 1);
                        }
                    }
                }
            }
        });
        let killer = async {
            // Kill once this round has sold a few, while purchases are in flight.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while round_201.get() < 20 && std::time::Instant::now() < deadline {
                actix_web::rt::time::sleep(Duration::from_millis(5)).await;
            }
            server
                .child
                .start_kill()
                .unwrap_or_else(|e| panic!("kill: {e}"));
            let _ = server.child.wait().await;
            stop.set(true);
        };
        tokio::join!(join_all(drivers), killer);
        assert!(
            round_201.get() >= 20,
            "round {round} sold too little before the kill"
        );
        // What PostgreSQL held at the moment of the kill, before recovery.
        let db = db_client(&settings).await;
        let at_kill = held_order_ids(&db, sale_id).await;
        let not_yet_written = answered.borrow().difference(&at_kill).count();
        eprintln!(
            "round {round}: {} answered 201 this round, {} in total, {not_yet_written} not yet in PostgreSQL at the kill",
            round_201.get(),
            answered.borrow().len()
        );
        if held_back {
            assert!(
                not_yet_written > 0,
                "round {round}: the kill must find orders only in RabbitMQ"
            );
            locker
                .batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        drop(locker);
        server = start(&settings, &client).await;
    }

    // After the last restart (recovery drained the log): every 201 is stored.
    let db = db_client(&settings).await;
    let answered = answered.into_inner();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut stored = held_order_ids(&db, sale_id).await;
    while !answered.is_subset(&stored) && std::time::Instant::now() < deadline {
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        stored = held_order_ids(&db, sale_id).await;
    }
    let missing: Vec<_> = answered.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "{} orders answered 201 are not in PostgreSQL: {missing:?}",
        missing.len()
    );
    let held = assert_sale_invariants(&db, sale_id).await;
    assert!(held as u64 <= stock);
    // The restarted server agrees with PostgreSQL about what is left.
    let view: Value = client
        .get(format!("{}/api/v1/sales/{sale_id}", server.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(
        view["stock_left"].as_u64(),
        Some(stock - held as u64),
        "{view}"
    );
    // A buyer who already holds a unit is still refused after all the restarts.
    let owner: Uuid = db
        .query_one(
            "SELECT user_id FROM orders WHERE sale_id = $1 AND status = 'reserved' LIMIT 1",
            &[&sale_id],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|e| panic!("{e}"));
    let token = buyers
        .iter()
        .find(|(u, _)| *u == owner)
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    let res = client
        .post(format!("{}/api/v1/sales/{sale_id}/purchases", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["code"] == "limit_reached" || body["code"] == "sold_out",
        "{body}"
    );

    let _ = server.child.start_kill();
    let _ = server.child.wait().await;
    cleanup(&settings).await;
}

#[actix_web::test]
async fn sigterm_mid_load_finishes_in_flight_work_and_exits_cleanly() {
    let settings = test_settings();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut server = start(&settings, &client).await;
    let sale: Value = client
        .post(format!("{}/admin/v1/sales", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&sale_body(
            json!({"stock_total": 10_000, "per_user_limit": 1}),
        ))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    let sale_id = uuid_of(&sale["id"]);
    let answered: RefCell<HashSet<Uuid>> = RefCell::new(HashSet::new());
    let refused = Cell::new(0usize);
    let stop = Cell::new(false);
    let base = server.base.clone();
    let drivers = (0..32).map(|_| {
        let (client, base, settings, answered, refused, stop) =
            (&client, &base, &settings, &answered, &refused, &stop);
        async move {
            while !stop.get() {
                let (_, token) = mint_shopper(settings);
                let sent = client
                    .post(format!("{base}/api/v1/sales/{sale_id}/purchases"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                match sent {
                    Ok(res) if res.status() == 201 => {
                        if let Ok(body) = res.json::<Value>().await {
                            answered.borrow_mut().insert(uuid_of(&body["id"]));
                        }
                    }
                    Ok(res) if res.status() == 503 => refused.set(refused.get() + 1),
                    Ok(res) => panic!("unexpected {}", res.status()),
                    Err(_) => {
                        // The server has closed its listener.
                        actix_web::rt::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    });
    let terminator = async {
        while answered.borrow().len() < 100 {
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
        let pid = server.child.id().unwrap_or_default();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the server did not stop within 30 s"))
            .unwrap_or_else(|e| panic!("{e}"));
        stop.set(true);
        exit
    };
    let ((), exit) = tokio::join!(join_all(drivers).map(|_| ()), terminator);
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
    // No waiting and no restart: the drain happened before the exit.
    let db = db_client(&settings).await;
    let stored = held_order_ids(&db, sale_id).await;
    let answered = answered.into_inner();
    assert!(answered.len() >= 100);
    let missing = answered.difference(&stored).count();
    assert_eq!(
        missing, 0,
        "every 201 is in PostgreSQL when the process has exited"
    );
    cleanup(&settings).await;
}
