//! Live updates: server-sent event streams of one sale, of every sale and
//! of the admin status, and the pages that read them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{assert_problem, header, mint_shopper, spawn_app_with, TestApp, ADMIN_TOKEN};
use crate::helpers::{both_modes, spawn_app_in, test_settings_in, Mode};

/// One server-sent event.
#[derive(Debug)]
struct Event {
    id: String,
    name: String,
    data: Value,
}

/// An open event stream, read chunk by chunk.
struct Stream {
    res: reqwest::Response,
    buf: String,
}

impl Stream {
    async fn open(app: &TestApp, path: &str, last_id: Option<&str>) -> reqwest::Response {
        let mut req = app.client.get(app.url(path));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"))
    }

    async fn start(app: &TestApp, path: &str, last_id: Option<&str>) -> Stream {
        let res = Self::open(app, path, last_id).await;
        assert_eq!(res.status().as_u16(), 200, "{path}");
        assert_eq!(header(&res, "content-type"), "text/event-stream");
        Stream {
            res,
            buf: String::new(),
        }
    }

    /// The next event within `within` (comments and the retry hint skipped).
    async fn next(&mut self, within: Duration) -> Option<Event> {
        let deadline = Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut name, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if !data.is_empty() {
                    let data =
                        serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
                    return Some(Event { id, name, data });
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.res.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(_) => panic!("the stream ended"),
                Err(_) => return None,
            }
        }
    }

    /// The next event within `within`; fails naming `what` if none comes.
    async fn expect(&mut self, within: Duration, what: &str) -> Event {
        self.next(within)
            .await
            .unwrap_or_else(|| panic!("{what} within {within:?}"))
    }

    /// Events until one satisfies `done`, within `within`; all of them.
    async fn until(&mut self, within: Duration, done: impl Fn(&Event) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no such event within {within:?}; saw {seen:?}"));
            let Some(e) = self.next(left).await else {
                panic!("no such event within {within:?}; saw {seen:?}");
            };
            let stop = done(&e);
            seen.push(e);
            if stop {
                return seen;
            }
        }
    }
}

async fn a_sale_stream_sends_the_state_then_every_change_coalesced_and_sold_out_at_once(
    mode: Mode,
) {
    let app = spawn_app_in(mode).await;
    let sale = app
        .create_sale(json!({"stock_total": 30, "per_user_limit": 1}))
        .await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let path = format!("/api/v1/sales/{sale_id}/events");
    let mut stream = Stream::start(&app, &path, None).await;
    let first = stream
        .expect(Duration::from_secs(2), "no first event")
        .await;
    assert_eq!(first.name, "sale");
    assert_eq!(
        (first.data["id"].as_str(), first.data["stock_left"].as_i64()),
        (Some(sale_id), Some(30))
    );
    assert!(first.data["server_time"].is_string(), "{:?}", first.data);
    // 30 purchases as fast as they go: far fewer events than changes, and
    // the last shows the sale sold out within a second of the last unit.
    let tokens: Vec<String> = (0..30).map(|_| mint_shopper(&app.settings).1).collect();
    let app_ref = &app;
    let buys = tokens
        .iter()
        .map(|token| async move { app_ref.purchase(sale_id, token, None, None).await.0 });
    let started = Instant::now();
    let statuses = futures_util::future::join_all(buys).await;
    let sold_at = Instant::now();
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    let seen = stream
        .until(Duration::from_secs(1), |e| e.data["status"] == "sold_out")
        .await;
    let last = seen.last().map(|e| &e.data);
    assert_eq!(last.and_then(|d| d["stock_left"].as_i64()), Some(0));
    let spent = started.elapsed().max(Duration::from_millis(100));
    let most = 1 + (spent.as_millis() / 100) as usize + 1;
    assert!(
        seen.len() <= most,
        "{} events in {spent:?} (at most 10 per second): {seen:?}",
        seen.len()
    );
    assert!(sold_at.elapsed() < Duration::from_secs(1));
    // Ids increase.
    let ids: Vec<u64> = std::iter::once(&first)
        .chain(seen.iter())
        .map(|e| e.id.parse().unwrap_or(0))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    app.teardown().await;
}

async fn last_event_id_is_honoured_and_unknown_sales_are_404(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let sale = app.create_sale(json!({"stock_total": 5})).await;
    let sale_id = sale["id"].as_str().unwrap_or_default();
    let path = format!("/api/v1/sales/{sale_id}/events");
    let mut stream = Stream::start(&app, &path, None).await;
    let first = stream
        .expect(Duration::from_secs(2), "no first event")
        .await;
    drop(stream);
    // A client that has the current state gets nothing until it changes.
    let mut again = Stream::start(&app, &path, Some(&first.id)).await;
    assert!(again.next(Duration::from_millis(400)).await.is_none());
    let (_, token) = mint_shopper(&app.settings);
    assert_eq!(app.purchase(sale_id, &token, None, None).await.0, 201);
    let next = again
        .expect(Duration::from_secs(2), "no event after a change")
        .await;
    assert_eq!(next.data["stock_left"], 4);
    // One with an older state gets the current one at once.
    let mut older = Stream::start(&app, &path, Some("0")).await;
    let current = older
        .expect(Duration::from_secs(1), "no current state")
        .await;
    assert_eq!(
        (current.id, current.data["stock_left"].as_i64()),
        (next.id, Some(4))
    );
    let res = Stream::open(
        &app,
        "/api/v1/sales/0190a0c4-0000-7000-8000-000000000000/events",
        None,
    )
    .await;
    assert_problem(res, 404, "sale_not_found").await;
    app.teardown().await;
}

async fn the_stream_of_every_sale_shows_new_sales_and_changes(mode: Mode) {
    let app = spawn_app_in(mode).await;
    let a = app
        .create_sale(json!({"name": "First", "stock_total": 3}))
        .await;
    let mut stream = Stream::start(&app, "/api/v1/sales/events", None).await;
    let first = stream
        .expect(Duration::from_secs(2), "no first event")
        .await;
    assert_eq!((first.name.as_str(), &first.data["id"]), ("sale", &a["id"]));
    let b = app
        .create_sale(json!({"name": "Second", "stock_total": 2}))
        .await;
    stream
        .until(Duration::from_secs(2), |e| e.data["id"] == b["id"])
        .await;
    let (_, token) = mint_shopper(&app.settings);
    let b_id = b["id"].as_str().unwrap_or_default();
    assert_eq!(app.purchase(b_id, &token, None, None).await.0, 201);
    stream
        .until(Duration::from_secs(2), |e| {
            e.data["id"] == b["id"] && e.data["stock_left"] == 1
        })
        .await;
    // An admin pause shows as the sale's status.
    let res = app
        .post(
            &format!("/admin/v1/sales/{b_id}/pause"),
            &json!({}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(res.status().as_u16(), 200);
    stream
        .until(Duration::from_secs(2), |e| {
            e.data["id"] == b["id"] && e.data["status"] == "paused"
        })
        .await;
    app.teardown().await;
}

async fn open_streams_are_bounded_per_address_and_in_all(mode: Mode) {
    let mut settings = test_settings_in(mode);
    settings.events.max_streams_per_ip = 2;
    settings.events.max_streams = 3;
    // A closed stream is noticed at the next write at the latest.
    settings.events.keepalive_secs = 1;
    let app = spawn_app_with(settings).await;
    let sale = app.create_sale(json!({})).await;
    let path = format!(
        "/api/v1/sales/{}/events",
        sale["id"].as_str().unwrap_or_default()
    );
    let one = Stream::start(&app, &path, None).await;
    let two = Stream::start(&app, "/api/v1/sales/events", None).await;
    let res = Stream::open(&app, &path, None).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
    drop(one);
    // Its place comes back once the server sees the stream closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = Stream::open(&app, &path, None).await;
        if res.status().as_u16() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(two);
    app.teardown().await;
}

async fn the_admin_stream_opens_with_a_ticket_never_the_token(mode: Mode) {
    let app = spawn_app_in(mode).await;
    app.create_sale(json!({"name": "Watched"})).await;
    assert_problem(
        Stream::open(&app, "/admin/v1/events", None).await,
        401,
        "unauthenticated",
    )
    .await;
    assert_problem(
        Stream::open(
            &app,
            &format!("/admin/v1/events?ticket={ADMIN_TOKEN}"),
            None,
        )
        .await,
        401,
        "unauthenticated",
    )
    .await;
    let res = app.post("/admin/v1/events/tickets", &json!({}), None).await;
    assert_problem(res, 401, "unauthenticated").await;
    let res = app
        .post("/admin/v1/events/tickets", &json!({}), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(res.status().as_u16(), 201);
    let ticket: Value = res.json().await.unwrap_or_default();
    let t = ticket["ticket"].as_str().unwrap_or_default();
    assert!(!t.contains(ADMIN_TOKEN));
    // A forged ticket (another expiry, the same signature) is refused.
    let (at, sig) = t.split_once('.').unwrap_or_default();
    let forged = format!("{}.{sig}", at.parse::<i64>().unwrap_or(0) + 3600);
    assert_problem(
        Stream::open(&app, &format!("/admin/v1/events?ticket={forged}"), None).await,
        401,
        "unauthenticated",
    )
    .await;
    let mut stream = Stream::start(&app, &format!("/admin/v1/events?ticket={t}"), None).await;
    let first = stream
        .expect(Duration::from_secs(3), "no admin event")
        .await;
    assert_eq!(first.name, "actors");
    assert_eq!(first.data["stock_actors"][0]["name"], "Watched");
    assert!(first.data["pipeline"]["publisher"]["connected"].is_boolean());
    let second = stream
        .expect(Duration::from_secs(3), "no second admin event")
        .await;
    assert_ne!(first.id, second.id);
    app.teardown().await;
}

#[actix_web::test]
async fn pages_are_served_with_their_types_a_strict_policy_and_etags() {
    let app = spawn_app_in(Mode::Embedded).await;
    for (path, ct) in [
        ("/", "text/html; charset=utf-8"),
        ("/admin", "text/html; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/shop.js", "text/javascript; charset=utf-8"),
        ("/assets/admin.js", "text/javascript; charset=utf-8"),
        ("/assets/api.js", "text/javascript; charset=utf-8"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let res = app.get(path, None).await;
        assert_eq!(res.status().as_u16(), 200, "{path}");
        assert_eq!(header(&res, "content-type"), ct, "{path}");
        let csp = header(&res, "content-security-policy");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{path}: {csp}"
        );
        assert_eq!(header(&res, "x-content-type-options"), "nosniff");
        let etag = header(&res, "etag");
        assert!(etag.starts_with('"'), "{path}: {etag}");
        let again = app
            .client
            .get(app.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.status().as_u16(), 304, "{path}");
    }
    let res = app.get("/", None).await;
    let html = res.text().await.unwrap_or_default();
    assert!(html.contains("<script type=\"module\" src=\"/assets/shop.js\">"));
    assert_problem(app.get("/assets/nope.js", None).await, 404, "not_found").await;
    app.teardown().await;
}

both_modes!(
    a_sale_stream_sends_the_state_then_every_change_coalesced_and_sold_out_at_once,
    last_event_id_is_honoured_and_unknown_sales_are_404,
    the_stream_of_every_sale_shows_new_sales_and_changes,
    open_streams_are_bounded_per_address_and_in_all,
    the_admin_stream_opens_with_a_ticket_never_the_token,
);
