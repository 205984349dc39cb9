//! The promises across `kill -9`: the real binary is driven with a rush of
//! purchases, payments and cancellations, killed at random moments ten
//! times, restarted each time, and after every restart each invariant of
//! ARCHITECTURE.md is checked against the store and the server, in both
//! storage modes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::FutureExt;
use rand::Rng;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    assert_sale_invariants, both_modes, cleanup, held_order_ids, mint_shopper, stored_counters,
    test_settings_in, uuid_of, wait_ready, Mode, Probe, ServerProcess, StoreLock, ADMIN_TOKEN,
};

/// What the server acknowledged about an order: a 201, then perhaps a 200
/// to a payment or a cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acked {
    Reserved,
    Paid,
    Cancelled,
}

/// One buyer's acknowledged orders, by the key that made each.
#[derive(Default)]
struct Buyer {
    presses: u32,
    orders: Vec<(String, Uuid, Acked)>,
}

/// Every order id the store holds for the sale, with its status.
async fn stored_statuses(db: &Probe, sale: Uuid) -> HashMap<Uuid, String> {
    db.orders(sale)
        .await
        .into_iter()
        .map(|o| (o.id, o.status))
        .collect()
}

/// One round of load: until `stop`, each driver picks a buyer and either
/// presses "buy" with a fresh key, or pays or cancels one of its reserved
/// orders. Only acknowledged answers are recorded.
async fn drive(
    client: &reqwest::Client,
    base: &str,
    sale: Uuid,
    tokens: &[(Uuid, String)],
    buyers: &RefCell<Vec<Buyer>>,
    stop: &Cell<bool>,
    acks: &Cell<usize>,
) {
    while !stop.get() {
        let (i, roll) = {
            let mut rng = rand::thread_rng();
            (rng.gen_range(0..tokens.len()), rng.gen_range(0..10u8))
        };
        let reserved = buyers.borrow()[i]
            .orders
            .iter()
            .position(|(_, _, a)| *a == Acked::Reserved);
        let token = &tokens[i].1;
        match reserved {
            Some(at) if roll < 6 => {
                let id = buyers.borrow()[i].orders[at].1;
                let (action, acked) = if roll < 3 {
                    ("payment", Acked::Paid)
                } else {
                    ("cancel", Acked::Cancelled)
                };
                let sent = client
                    .post(format!("{base}/api/v1/orders/{id}/{action}"))
                    .bearer_auth(token)
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status() == 200) {
                    buyers.borrow_mut()[i].orders[at].2 = acked;
                    acks.set(acks.get() + 1);
                }
            }
            _ => {
                let key = {
                    let mut b = buyers.borrow_mut();
                    b[i].presses += 1;
                    format!("press-{}", b[i].presses)
                };
                let sent = client
                    .post(format!("{base}/api/v1/sales/{sale}/purchases"))
                    .bearer_auth(token)
                    .header("idempotency-key", &key)
                    .send()
                    .await;
                let Ok(res) = sent else { continue };
                if res.status() == 201 {
                    if let Ok(body) = res.json::<Value>().await {
                        let id = uuid_of(&body["id"]);
                        buyers.borrow_mut()[i]
                            .orders
                            .push((key, id, Acked::Reserved));
                        acks.set(acks.get() + 1);
                    }
                }
            }
        }
    }
}

/// Every invariant, after a restart, against the store and the server.
async fn check_invariants(
    client: &reqwest::Client,
    base: &str,
    db: &Probe,
    sale: Uuid,
    stock: i64,
    tokens: &[(Uuid, String)],
    buyers: &RefCell<Vec<Buyer>>,
) {
    // 1, 2: no oversell, no buyer over the limit.
    let held = assert_sale_invariants(db, sale).await;
    // 3, 5: every acknowledged order and decision is in the store as told.
    let stored = stored_statuses(db, sale).await;
    for b in buyers.borrow().iter() {
        for (_, id, acked) in &b.orders {
            let status = stored.get(id).map(String::as_str);
            let ok = match acked {
                Acked::Reserved => matches!(status, Some("reserved" | "paid" | "cancelled")),
                Acked::Paid => status == Some("paid"),
                Acked::Cancelled => status == Some("cancelled"),
            };
            assert!(
                ok,
                "order {id} acknowledged {acked:?} is {status:?} in the store"
            );
        }
    }
    // 4: a key gives back its order, never a second one (a sample).
    let sample: Vec<(usize, String, Uuid)> = buyers
        .borrow()
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.orders.first().map(|(k, id, _)| (i, k.clone(), *id)))
        .take(5)
        .collect();
    for (i, key, id) in sample {
        let res = client
            .post(format!("{base}/api/v1/sales/{sale}/purchases"))
            .bearer_auth(&tokens[i].1)
            .header("idempotency-key", &key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or_default();
        assert_eq!(status, 200, "replay of {key}: {body}");
        assert_eq!(uuid_of(&body["id"]), id, "replay of {key}");
    }
    // 5: units came back exactly once: the server's stock and counters are
    // the store's.
    let view: Value = client
        .get(format!("{base}/admin/v1/sales/{sale}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(view["stock_left"].as_i64(), Some(stock - held), "{view}");
    let (reserved, paid, _, cancelled) = stored_counters(db, sale).await;
    assert_eq!(
        (
            view["reserved"].as_i64(),
            view["paid"].as_i64(),
            view["cancelled"].as_i64()
        ),
        (Some(reserved), Some(paid), Some(cancelled)),
        "{view}"
    );
}

async fn the_promises_hold_across_ten_sigkills_at_random_moments(mode: Mode) {
    let settings = test_settings_in(mode);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let stock = 20_000i64;
    let mut server = ServerProcess::start(&settings, &client).await;
    let sale_id = server
        .create_sale(&client, json!({"stock_total": stock, "per_user_limit": 2}))
        .await;
    let tokens: Vec<(Uuid, String)> = (0..4000).map(|_| mint_shopper(&settings)).collect();
    let buyers: RefCell<Vec<Buyer>> =
        RefCell::new((0..tokens.len()).map(|_| Buyer::default()).collect());
    let db = Probe::open(&settings).await;

    for round in 0..10 {
        // In every other round the store is locked by another client. In
        // services mode from the start: the writers are held back, so the
        // kill finds acknowledged orders and decisions only in RabbitMQ,
        // exactly the window where other designs lose them. In embedded
        // mode once the round has acknowledged work: every commit then
        // waits, so the kill finds batches in flight, and the restart finds
        // the file locked.
        let held_back = round % 2 == 1;
        let mut locker = if held_back && mode == Mode::Services {
            Some(StoreLock::take(&settings).await)
        } else {
            None
        };
        let stop = Cell::new(false);
        let acks = Cell::new(0usize);
        let base = server.base.clone();
        let drivers =
            (0..32).map(|_| drive(&client, &base, sale_id, &tokens, &buyers, &stop, &acks));
        let killer = async {
            // A random moment once this round has some acknowledged work.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while acks.get() < 10 && std::time::Instant::now() < deadline {
                actix_web::rt::time::sleep(Duration::from_millis(5)).await;
            }
            if held_back && locker.is_none() {
                locker = Some(StoreLock::take(&settings).await);
            }
            let wait = rand::thread_rng().gen_range(0..800);
            actix_web::rt::time::sleep(Duration::from_millis(wait)).await;
            server.kill().await;
            stop.set(true);
        };
        tokio::join!(join_all(drivers), killer);
        assert!(
            acks.get() >= 10,
            "round {round} acknowledged too little before the kill"
        );
        match (locker.take(), mode) {
            (Some(lock), Mode::Embedded) => {
                // Restart with the file still locked: the server must start
                // and answer, and open once the lock goes.
                server = ServerProcess::spawn(&settings, &[]);
                let hold = rand::thread_rng().gen_range(500..2500);
                actix_web::rt::time::sleep(Duration::from_millis(hold)).await;
                lock.release().await;
                assert!(wait_ready(&client, &server.base, Duration::from_secs(60)).await);
            }
            (Some(lock), Mode::Services) => {
                let at_kill = held_order_ids(&db, sale_id).await;
                let only_in_log = buyers
                    .borrow()
                    .iter()
                    .flat_map(|b| &b.orders)
                    .filter(|(_, id, a)| *a != Acked::Cancelled && !at_kill.contains(id))
                    .count();
                eprintln!(
                "round {round}: {} acknowledged, {only_in_log} orders only in RabbitMQ at the kill",
                acks.get()
            );
                assert!(
                    only_in_log > 0,
                    "round {round}: the kill must find orders only in RabbitMQ"
                );
                // Restart while the writers are still held back, past the drain
                // warning: no sale may open before the whole log is written.
                server = ServerProcess::spawn(
                    &settings,
                    &[("FLASHSALE__ORDERS__RECOVERY_DRAIN_WARN_SECS", "1")],
                );
                let hold = rand::thread_rng().gen_range(500..2500);
                actix_web::rt::time::sleep(Duration::from_millis(hold)).await;
                lock.release().await;
                assert!(wait_ready(&client, &server.base, Duration::from_secs(60)).await);
            }
            (None, _) => server = ServerProcess::start(&settings, &client).await,
        }
        check_invariants(&client, &server.base, &db, sale_id, stock, &tokens, &buyers).await;
    }
    // A buyer at the limit is still refused after all the restarts.
    let full = buyers.borrow().iter().position(|b| {
        b.orders
            .iter()
            .filter(|(_, _, a)| *a != Acked::Cancelled)
            .count()
            >= 2
    });
    if let Some(i) = full {
        let res = client
            .post(format!("{}/api/v1/sales/{sale_id}/purchases", server.base))
            .bearer_auth(&tokens[i].1)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let body: Value = res.json().await.unwrap_or_default();
        assert!(
            body["code"] == "limit_reached" || body["code"] == "sold_out",
            "{body}"
        );
    }
    server.kill().await;
    cleanup(&settings).await;
}

async fn sigterm_mid_load_finishes_in_flight_work_and_exits_cleanly(mode: Mode) {
    let settings = test_settings_in(mode);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut server = ServerProcess::start(&settings, &client).await;
    let sale_id = server
        .create_sale(&client, json!({"stock_total": 10_000, "per_user_limit": 1}))
        .await;
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
    let db = Probe::open(&settings).await;
    let stored = held_order_ids(&db, sale_id).await;
    let answered = answered.into_inner();
    assert!(answered.len() >= 100);
    let missing = answered.difference(&stored).count();
    assert_eq!(
        missing, 0,
        "every 201 is in the store when the process has exited"
    );
    cleanup(&settings).await;
}

both_modes!(
    the_promises_hold_across_ten_sigkills_at_random_moments,
    sigterm_mid_load_finishes_in_flight_work_and_exits_cleanly,
);
