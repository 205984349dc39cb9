//! Spawns a fresh application per test, in either storage mode: embedded
//! (its own SQLite file in its own directory) or services (its own
//! PostgreSQL database, created and migrated, Redis key prefix and RabbitMQ
//! queue names), on port 0. Tests run in parallel and clean up after
//! themselves; databases left by a test that panicked are swept by a later
//! run once they are an hour old.
//!
//! [`both_modes!`] runs a test in both modes; [`Probe`] reads what the
//! store holds, whichever it is.

use std::sync::Once;

use chrono::{DateTime, Duration, Utc};
use flashsale::config::{Overrides, Settings, StorageMode};
use flashsale::startup::{Application, ShutdownHandle};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use uuid::Uuid;

pub const ADMIN_TOKEN: &str = "test-admin-token";
const TEST_DB_PREFIX: &str = "flashsale_test_";

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    shutdown: ShutdownHandle,
    server: actix_web::rt::task::JoinHandle<std::io::Result<()>>,
}

/// A unique id for this test's resources: its time (for the stale sweep)
/// and a random part.
fn unique_id() -> String {
    format!(
        "{}_{}",
        Utc::now().timestamp(),
        &Uuid::new_v4().simple().to_string()[..12]
    )
}

fn maintenance_url() -> String {
    std::env::var("FLASHSALE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A storage mode a test runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    Services,
}

/// Makes, for each `name`, a module `name` with two tests, `embedded` and
/// `services`, each calling `name(mode)`: one test body, both modes.
macro_rules! both_modes {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[actix_web::test]
                async fn embedded() {
                    super::$name($crate::helpers::Mode::Embedded).await
                }
                #[actix_web::test]
                async fn services() {
                    super::$name($crate::helpers::Mode::Services).await
                }
            }
        )+
    };
}
pub(crate) use both_modes;

/// Settings for one test in services mode (see [`test_settings_in`]).
pub fn test_settings() -> Settings {
    test_settings_in(Mode::Services)
}

/// Settings for one test: shipped defaults, isolated names (a SQLite file
/// of its own, or a database, prefix and queues of its own), cheap hashing.
pub fn test_settings_in(mode: Mode) -> Settings {
    let mut s = Settings::load_without_env(None, &Overrides::default())
        .unwrap_or_else(|e| panic!("shipped config must load: {e}"));
    let id = unique_id();
    s.server.port = 0;
    s.server.workers = 2;
    s.storage.mode = match mode {
        Mode::Embedded => StorageMode::Embedded,
        Mode::Services => StorageMode::Services,
    };
    s.storage.path = std::env::temp_dir()
        .join(format!("{TEST_DB_PREFIX}{id}"))
        .join("flashsale.db");
    s.database.url = SecretString::from(format!("{}/{TEST_DB_PREFIX}{id}", maintenance_url()));
    s.database.pool_size = 4;
    s.redis.key_prefix = format!("flashsale_test:{id}");
    s.rabbitmq.queue = format!("flashsale.test.{id}.orders");
    s.rabbitmq.dead_letter_queue = format!("flashsale.test.{id}.dead");
    s.auth.admin_token = SecretString::from(ADMIN_TOKEN);
    s.auth.argon2_memory_kib = 256;
    s.auth.argon2_iterations = 1;
    s.telemetry.log_filter = "warn".into();
    // Tests hammer from one address with many requests per buyer; the
    // protection tests turn these back on.
    s.limits.per_ip_per_second = 0;
    s.limits.purchases_per_user_per_second = 0;
    s.limits.logins_per_ip_per_minute = 0;
    s.limits.logins_per_username_per_minute = 0;
    s
}

pub fn db_name(settings: &Settings) -> String {
    let url = settings.database.url.expose_secret();
    url.rsplit('/').next().unwrap_or_default().to_owned()
}

static SWEEP: Once = Once::new();

/// Drops test databases more than an hour old (left by a crashed run).
async fn sweep_stale_databases() {
    let Ok((client, conn)) = tokio_postgres::connect(
        &format!("{}/postgres", maintenance_url()),
        tokio_postgres::NoTls,
    )
    .await
    else {
        return;
    };
    actix_web::rt::spawn(conn);
    let Ok(rows) = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            &[&format!("{TEST_DB_PREFIX}%")],
        )
        .await
    else {
        return;
    };
    let cutoff = (Utc::now() - Duration::hours(1)).timestamp();
    for row in rows {
        let name: String = row.get(0);
        let ts = name
            .trim_start_matches(TEST_DB_PREFIX)
            .split('_')
            .next()
            .and_then(|t| t.parse::<i64>().ok());
        if ts.is_some_and(|t| t < cutoff) {
            let _ = client
                .simple_query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_settings()).await
}

pub async fn spawn_app_in(mode: Mode) -> TestApp {
    spawn_app_with(test_settings_in(mode)).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let mut first = false;
    SWEEP.call_once(|| first = true);
    if first {
        sweep_stale_databases().await;
    }
    let app = Application::build(settings.clone())
        .await
        .unwrap_or_else(|e| panic!("application must start: {e}"));
    let port = app.port();
    let shutdown = app.shutdown_handle();
    let server = actix_web::rt::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_else(|e| panic!("{e}")),
        settings,
        shutdown,
        server,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn patch(&self, path: &str, body: &Value, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.patch(self.url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("PATCH {path}: {e}"))
    }

    pub async fn register(&self, username: &str, password: &str) -> reqwest::Response {
        self.post(
            "/api/v1/users",
            &json!({"username": username, "password": password}),
            None,
        )
        .await
    }

    /// Registers a fresh user and returns its id and a token.
    pub async fn new_shopper(&self) -> (String, String) {
        let username = format!("u{}", &Uuid::new_v4().simple().to_string()[..16]);
        let res = self.register(&username, "password123").await;
        assert_eq!(res.status(), 201, "register {username}");
        let user: Value = res.json().await.unwrap_or_default();
        let res = self
            .post(
                "/api/v1/sessions",
                &json!({"username": username, "password": "password123"}),
                None,
            )
            .await;
        assert_eq!(res.status(), 200, "login {username}");
        let session: Value = res.json().await.unwrap_or_default();
        (
            user["id"].as_str().unwrap_or_default().to_owned(),
            session["token"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// Creates a sale (admin); `overrides` replaces fields of a live default.
    pub async fn create_sale(&self, overrides: Value) -> Value {
        let res = self
            .post("/admin/v1/sales", &sale_body(overrides), Some(ADMIN_TOKEN))
            .await;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or_default();
        assert_eq!(status, 201, "create sale: {body}");
        body
    }

    /// Stops the server and removes everything the test created.
    pub async fn teardown(self) {
        self.shutdown.stop();
        let _ = self.server.await;
        cleanup(&self.settings).await;
    }
}

/// Drops the test's SQLite directory, or its database, queues and Redis keys.
pub async fn cleanup(settings: &Settings) {
    if settings.storage.mode == StorageMode::Embedded {
        if let Some(dir) = settings.storage.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        return;
    }
    let name = db_name(settings);
    if let Ok((client, conn)) = tokio_postgres::connect(
        &format!("{}/postgres", maintenance_url()),
        tokio_postgres::NoTls,
    )
    .await
    {
        actix_web::rt::spawn(conn);
        let _ = client
            .simple_query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    if let Ok(conn) =
        flashsale::persistence::rabbit::connect(&settings.rabbitmq, "test-cleanup").await
    {
        if let Ok(ch) = conn.create_channel().await {
            for q in [
                &settings.rabbitmq.queue,
                &settings.rabbitmq.dead_letter_queue,
            ] {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            let _ = ch
                .exchange_delete(
                    settings.rabbitmq.dead_letter_queue.as_str().into(),
                    Default::default(),
                )
                .await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
    if let Ok(client) = bb8_redis::redis::Client::open(settings.redis.url.expose_secret()) {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let pattern = format!("{}:*", settings.redis.key_prefix);
            let keys: Vec<String> = bb8_redis::redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = bb8_redis::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A valid sale body that is live now for an hour; `overrides` wins.
pub fn sale_body(overrides: Value) -> Value {
    let now = Utc::now();
    let mut body = json!({
        "name": "Limited sneakers",
        "description": "Only a few pairs",
        "price_cents": 12_900,
        "currency": "EUR",
        "stock_total": 100,
        "per_user_limit": 1,
        "starts_at": rfc3339(now - Duration::seconds(5)),
        "ends_at": rfc3339(now + Duration::hours(1)),
    });
    if let (Some(b), Some(o)) = (body.as_object_mut(), overrides.as_object()) {
        for (k, v) in o {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// A response header as text ("" when absent or not text).
pub fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a problem answer and returns its body.
pub async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status for {code}");
    let ct = header(&res, "content-type");
    assert!(
        ct.starts_with("application/problem+json"),
        "content type {ct}"
    );
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// Mints a token for a fresh user id with the app's own secret, the way a
/// load test makes many shoppers without registering each.
pub fn mint_shopper(settings: &Settings) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let (token, _) = flashsale::auth::TokenKeys::new(&settings.auth)
        .issue(id)
        .unwrap_or_else(|e| panic!("{e}"));
    (id, token)
}

/// A direct connection to the test's database, for checking what is stored.
pub async fn db_client(settings: &Settings) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(settings.database.url.expose_secret(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("test database: {e}"));
    actix_web::rt::spawn(conn);
    client
}

/// What the test's store holds (its SQLite file, or its PostgreSQL
/// database), read the way a test checks it: directly, not through the API.
pub enum Probe {
    Postgres(tokio_postgres::Client),
    Sqlite(std::path::PathBuf),
}

/// One stored order, as the invariants need it.
#[derive(Debug, Clone)]
pub struct StoredOrder {
    pub id: Uuid,
    pub user_id: Uuid,
    pub quantity: i64,
    pub status: String,
    pub idempotency_key: Option<String>,
}

impl Probe {
    pub async fn open(settings: &Settings) -> Probe {
        match settings.storage.mode {
            StorageMode::Embedded => Probe::Sqlite(settings.storage.path.clone()),
            StorageMode::Services => Probe::Postgres(db_client(settings).await),
        }
    }

    fn sqlite(path: &std::path::Path) -> rusqlite::Connection {
        let conn =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap_or_else(|e| panic!("test SQLite file: {e}"));
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        conn
    }

    /// Every order of a sale, void ones included.
    pub async fn orders(&self, sale_id: Uuid) -> Vec<StoredOrder> {
        match self {
            Probe::Postgres(client) => client
                .query(
                    "SELECT id, user_id, quantity, status, idempotency_key FROM orders WHERE sale_id = $1",
                    &[&sale_id],
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .iter()
                .map(|r| StoredOrder {
                    id: r.get(0),
                    user_id: r.get(1),
                    quantity: i64::from(r.get::<_, i32>(2)),
                    status: r.get(3),
                    idempotency_key: r.get(4),
                })
                .collect(),
            Probe::Sqlite(path) => {
                let conn = Self::sqlite(path);
                let mut stmt = conn
                    .prepare("SELECT id, user_id, quantity, status, idempotency_key FROM orders WHERE sale_id = ?1")
                    .unwrap_or_else(|e| panic!("{e}"));
                let rows = stmt
                    .query_map([sale_id.as_bytes()], |r| {
                        Ok(StoredOrder {
                            id: Uuid::from_bytes(r.get(0)?),
                            user_id: Uuid::from_bytes(r.get(1)?),
                            quantity: r.get(2)?,
                            status: r.get(3)?,
                            idempotency_key: r.get(4)?,
                        })
                    })
                    .unwrap_or_else(|e| panic!("{e}"));
                rows.map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect()
            }
        }
    }

    /// A sale's stock and per-user limit as stored.
    pub async fn sale_limits(&self, sale_id: Uuid) -> (i64, i64) {
        match self {
            Probe::Postgres(client) => {
                let row = client
                    .query_one(
                        "SELECT stock_total, per_user_limit FROM sales WHERE id = $1",
                        &[&sale_id],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                (
                    i64::from(row.get::<_, i32>(0)),
                    i64::from(row.get::<_, i32>(1)),
                )
            }
            Probe::Sqlite(path) => Self::sqlite(path)
                .query_row(
                    "SELECT stock_total, per_user_limit FROM sales WHERE id = ?1",
                    [sale_id.as_bytes()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// The stored status of an order, if the store has it.
    pub async fn order_status(&self, id: Uuid) -> Option<String> {
        match self {
            Probe::Postgres(client) => client
                .query_opt("SELECT status FROM orders WHERE id = $1", &[&id])
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|r| r.get(0)),
            Probe::Sqlite(path) => {
                use rusqlite::OptionalExtension;
                Self::sqlite(path)
                    .query_row(
                        "SELECT status FROM orders WHERE id = ?1",
                        [id.as_bytes()],
                        |r| r.get(0),
                    )
                    .optional()
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        }
    }

    /// The stored password hash of a user.
    pub async fn password_hash(&self, username: &str) -> String {
        match self {
            Probe::Postgres(client) => client
                .query_one(
                    "SELECT password_hash FROM users WHERE username = $1",
                    &[&username],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or_else(|e| panic!("{e}")),
            Probe::Sqlite(path) => Self::sqlite(path)
                .query_row(
                    "SELECT password_hash FROM users WHERE username = ?1",
                    [username],
                    |r| r.get(0),
                )
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

/// Order ids in the store for a sale, with status reserved or paid.
pub async fn held_order_ids(probe: &Probe, sale_id: Uuid) -> std::collections::HashSet<Uuid> {
    probe
        .orders(sale_id)
        .await
        .into_iter()
        .filter(|o| o.status == "reserved" || o.status == "paid")
        .map(|o| o.id)
        .collect()
}

/// Waits (bounded) until the store holds at least `n` reserved or paid
/// orders for the sale, and returns what it holds then.
pub async fn wait_for_orders(
    probe: &Probe,
    sale_id: Uuid,
    n: usize,
) -> std::collections::HashSet<Uuid> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ids = held_order_ids(probe, sale_id).await;
        if ids.len() >= n || std::time::Instant::now() > deadline {
            return ids;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The invariants over what the store holds for a sale: units held by
/// reserved and paid orders never exceed the stock, no user holds more than
/// the limit, no (user, idempotency key) has two orders. Returns the units
/// held.
pub async fn assert_sale_invariants(probe: &Probe, sale_id: Uuid) -> i64 {
    let (stock, limit) = probe.sale_limits(sale_id).await;
    let orders = probe.orders(sale_id).await;
    let mut per_user: std::collections::HashMap<Uuid, i64> = Default::default();
    let mut keys = std::collections::HashSet::new();
    let mut held = 0;
    for o in &orders {
        if let Some(k) = &o.idempotency_key {
            assert!(
                keys.insert((o.user_id, k.clone())),
                "two orders for one idempotency key {k}"
            );
        }
        if o.status == "reserved" || o.status == "paid" {
            held += o.quantity;
            *per_user.entry(o.user_id).or_default() += o.quantity;
        }
    }
    assert!(held <= stock, "oversold: {held} units held of {stock}");
    let max_user = per_user.values().copied().max().unwrap_or(0);
    assert!(max_user <= limit, "a user holds {max_user} > limit {limit}");
    held
}

pub fn uuid_of(v: &Value) -> Uuid {
    Uuid::parse_str(v.as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

impl TestApp {
    /// POST a purchase; returns the status and the body.
    pub async fn purchase(
        &self,
        sale_id: &str,
        token: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(self.url(&format!("/api/v1/sales/{sale_id}/purchases")))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("purchase: {e}"));
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or_default())
    }
}

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_flashsale");

/// The server binary with `settings` passed as environment variables (the
/// shipped config.toml underneath), listening on `port`.
pub fn server_command(settings: &Settings, port: u16) -> std::process::Command {
    let mut cmd = std::process::Command::new(SERVER_BIN);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("FLASHSALE__SERVER__PORT", port.to_string())
        .env("FLASHSALE__SERVER__WORKERS", "2")
        .env(
            "FLASHSALE__DATABASE__URL",
            settings.database.url.expose_secret(),
        )
        .env("FLASHSALE__REDIS__KEY_PREFIX", &settings.redis.key_prefix)
        .env(
            "FLASHSALE__RABBITMQ__URL",
            settings.rabbitmq.url.expose_secret(),
        )
        .env("FLASHSALE__RABBITMQ__QUEUE", &settings.rabbitmq.queue)
        .env(
            "FLASHSALE__RABBITMQ__DEAD_LETTER_QUEUE",
            &settings.rabbitmq.dead_letter_queue,
        )
        .env("FLASHSALE__STORAGE__MODE", settings.storage.mode.as_str())
        .env("FLASHSALE__STORAGE__PATH", &settings.storage.path)
        .env("FLASHSALE__AUTH__ADMIN_TOKEN", ADMIN_TOKEN)
        .env(
            "FLASHSALE__AUTH__JWT_SECRET",
            settings.auth.jwt_secret.expose_secret(),
        )
        .env("FLASHSALE__TELEMETRY__LOG_FILTER", "warn")
        .env("FLASHSALE__LIMITS__PER_IP_PER_SECOND", "0")
        .env("FLASHSALE__LIMITS__PURCHASES_PER_USER_PER_SECOND", "0")
        .env("FLASHSALE__LIMITS__LOGINS_PER_IP_PER_MINUTE", "0")
        .env_remove("RUST_LOG");
    cmd
}

/// A port that was free a moment ago (for a server started as a process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `/readyz` until it answers 200 (bounded).
pub async fn wait_ready(client: &reqwest::Client, base: &str, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(res) = client.get(format!("{base}/readyz")).send().await {
            if res.status() == 200 {
                return true;
            }
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Messages waiting in a queue of the test's broker.
pub async fn queue_depth(settings: &Settings, queue: &str) -> u32 {
    let conn = flashsale::persistence::rabbit::connect(&settings.rabbitmq, "test-depth")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ch = conn
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let depth = flashsale::persistence::rabbit::queue_depth(&ch, queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = conn.close(200, "done".into()).await;
    depth
}

impl TestApp {
    /// Stops the server gracefully and keeps its database, queues and keys,
    /// for a test that starts another app on the same world.
    pub async fn stop(self) -> Settings {
        self.shutdown.stop();
        let _ = self.server.await;
        self.settings
    }

    /// POST without a body or with one; returns the status and the body.
    pub async fn call(&self, path: &str, token: &str) -> (u16, Value) {
        let res = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or_default())
    }

    /// `GET /admin/v1/actors`: every stock actor and the order pipeline.
    pub async fn actors_status(&self) -> Value {
        self.get("/admin/v1/actors", Some(ADMIN_TOKEN))
            .await
            .json()
            .await
            .unwrap_or_default()
    }

    /// The admin view of a sale.
    pub async fn admin_sale(&self, sale_id: &str) -> Value {
        self.get(&format!("/admin/v1/sales/{sale_id}"), Some(ADMIN_TOKEN))
            .await
            .json()
            .await
            .unwrap_or_default()
    }
}

/// Units by status in the store for a sale, as (reserved, paid, expired, cancelled).
pub async fn stored_counters(probe: &Probe, sale_id: Uuid) -> (i64, i64, i64, i64) {
    let mut c = (0, 0, 0, 0);
    for o in probe.orders(sale_id).await {
        match o.status.as_str() {
            "reserved" => c.0 += o.quantity,
            "paid" => c.1 += o.quantity,
            "expired" => c.2 += o.quantity,
            "cancelled" => c.3 += o.quantity,
            _ => {}
        }
    }
    c
}

/// Waits (bounded) until the store's counters for the sale equal the admin
/// view's, then checks the stock adds up; returns the admin view.
pub async fn assert_counters_match(app: &TestApp, sale_id: &str) -> Value {
    let db = Probe::open(&app.settings).await;
    let id = Uuid::parse_str(sale_id).unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let view = app.admin_sale(sale_id).await;
        let admin = (
            view["reserved"].as_i64().unwrap_or(-1),
            view["paid"].as_i64().unwrap_or(-1),
            view["expired"].as_i64().unwrap_or(-1),
            view["cancelled"].as_i64().unwrap_or(-1),
        );
        let stored = stored_counters(&db, id).await;
        let total = view["stock_total"].as_i64().unwrap_or(0);
        let left = view["stock_left"].as_i64().unwrap_or(0);
        if admin == stored && left + admin.0 + admin.1 == total {
            assert_sale_invariants(&db, id).await;
            return view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "admin {admin:?} vs the store {stored:?}, left {left} of {total}"
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The real server binary, running as a child process.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub base: String,
}

impl ServerProcess {
    /// Starts the binary with `settings` (and `env` on top) on a free port,
    /// without waiting for it to be ready.
    pub fn spawn(settings: &Settings, env: &[(&str, &str)]) -> ServerProcess {
        let port = free_port();
        let mut cmd = tokio::process::Command::from(server_command(settings, port));
        cmd.envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn server: {e}"));
        ServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Starts the binary and waits until `/readyz` says ready.
    pub async fn start(settings: &Settings, client: &reqwest::Client) -> ServerProcess {
        let server = Self::spawn(settings, &[]);
        assert!(
            wait_ready(client, &server.base, std::time::Duration::from_secs(60)).await,
            "server did not become ready"
        );
        server
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        self.child
            .start_kill()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        let _ = self.child.wait().await;
    }

    /// Creates a sale (admin) on this server; `overrides` replaces fields of
    /// a live default. Returns its id.
    pub async fn create_sale(&self, client: &reqwest::Client, overrides: Value) -> Uuid {
        let sale: Value = client
            .post(format!("{}/admin/v1/sales", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&sale_body(overrides))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or_default();
        uuid_of(&sale["id"])
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap_or_default();
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "kill -{name} {pid}");
    }
}

/// Polls `f` every 50 ms until it holds; fails the test after 20 s, naming
/// `what` was awaited.
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A lock another client holds on the test's store, for fault tests: in
/// PostgreSQL an exclusive lock on `orders` (the order writers wait, the
/// log keeps taking orders); in SQLite the write lock of the file (every
/// commit, the order log's included, waits for it).
pub enum StoreLock {
    Postgres(tokio_postgres::Client),
    Sqlite(rusqlite::Connection),
}

impl StoreLock {
    /// Takes the lock.
    pub async fn take(settings: &Settings) -> StoreLock {
        match settings.storage.mode {
            StorageMode::Services => {
                let client = db_client(settings).await;
                client
                    .batch_execute("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                StoreLock::Postgres(client)
            }
            StorageMode::Embedded => {
                let conn = rusqlite::Connection::open(&settings.storage.path)
                    .unwrap_or_else(|e| panic!("{e}"));
                conn.busy_timeout(std::time::Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("{e}"));
                conn.execute_batch("BEGIN IMMEDIATE")
                    .unwrap_or_else(|e| panic!("{e}"));
                StoreLock::Sqlite(conn)
            }
        }
    }

    /// Lets go of it.
    pub async fn release(self) {
        match self {
            StoreLock::Postgres(client) => client
                .batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            StoreLock::Sqlite(conn) => conn
                .execute_batch("ROLLBACK")
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }
}
