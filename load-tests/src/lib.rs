//! flashsale load tests: goose scenarios, each followed by an invariant
//! check against PostgreSQL and the admin API.
//!
//! Scenarios (`ScenarioKind`):
//! - `rush`: a sale starts a few seconds after the users are up; everyone
//!   waits for the start and buys at the same second, then tries again until
//!   the sale is sold out (each attempt by the next distinct buyer).
//! - `sold-out-storm`: a flood of purchase attempts on a sold-out sale.
//! - `browse`: listing and viewing sales.
//! - `lifecycle`: reserve, then pay, cancel or let the reservation expire.
//!
//! Buyers are minted tokens (signed with the server's JWT secret), handed out
//! by a shared cursor, so a few hundred goose users can act as a hundred
//! thousand distinct buyers. Every order answered 201 is remembered; the run
//! fails if one of them is missing from PostgreSQL, if a sale is oversold,
//! if a buyer exceeds the limit, or if the admin counters disagree with
//! PostgreSQL, whatever the speed.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use goose::config::GooseConfiguration;
use goose::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioKind {
    Rush,
    SoldOutStorm,
    Browse,
    Lifecycle,
}

impl FromStr for ScenarioKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "rush" => ScenarioKind::Rush,
            "sold-out-storm" => ScenarioKind::SoldOutStorm,
            "browse" => ScenarioKind::Browse,
            "lifecycle" => ScenarioKind::Lifecycle,
            other => {
                return Err(format!(
                    "unknown scenario {other:?}: rush, sold-out-storm, browse or lifecycle"
                ))
            }
        })
    }
}

/// Everything a run needs besides goose's own options.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub scenario: ScenarioKind,
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`.
    pub host: String,
    pub admin_token: String,
    /// Buyers' tokens (one distinct user each).
    pub tokens: Vec<String>,
    /// PostgreSQL URL of the server's database, for the invariant check.
    pub database_url: String,
    /// Units on sale (rush, lifecycle).
    pub stock: u32,
    /// Seconds between the users being up and the sale's start (rush).
    pub start_delay_secs: u32,
    /// Reservation lifetime for the lifecycle scenario.
    pub reservation_ttl_secs: u32,
}

/// What a run did and whether the invariants held.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, usize>,
    pub orders_created: usize,
    pub sale_ids: Vec<Uuid>,
    pub goose_requests: usize,
}

/// Shared by all goose users of a run.
struct Shared {
    host: String,
    tokens: Vec<String>,
    cursor: AtomicUsize,
    sale_ids: Vec<Uuid>,
    sale_starts_at: DateTime<Utc>,
    created: Mutex<HashSet<Uuid>>,
    statuses: Mutex<BTreeMap<u16, usize>>,
}

impl Shared {
    fn next_token(&self) -> &str {
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % self.tokens.len().max(1);
        self.tokens.get(i).map_or("", String::as_str)
    }

    fn count(&self, status: u16) {
        if let Ok(mut s) = self.statuses.lock() {
            *s.entry(status).or_insert(0) += 1;
        }
    }
}

async fn admin_post(
    client: &reqwest::Client,
    cfg: &RunConfig,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let res = client
        .post(format!("{}{path}", cfg.host))
        .bearer_auth(&cfg.admin_token)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {path}: {status}: {body}");
    }
    Ok(body)
}

fn sale_body(name: &str, stock: u32, starts_at: DateTime<Utc>, ttl: u32) -> Value {
    json!({
        "name": name,
        "price_cents": 1999,
        "currency": "EUR",
        "stock_total": stock,
        "per_user_limit": 1,
        "starts_at": starts_at.to_rfc3339(),
        "ends_at": (starts_at + chrono::Duration::hours(2)).to_rfc3339(),
        "reservation_ttl_secs": ttl,
    })
}

/// Creates the sales the scenario works on.
async fn set_up(cfg: &RunConfig) -> anyhow::Result<(Vec<Uuid>, DateTime<Utc>)> {
    let client = reqwest::Client::new();
    let now = Utc::now();
    let id = |v: &Value| -> anyhow::Result<Uuid> {
        v["id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| anyhow!("no sale id in {v}"))
    };
    match cfg.scenario {
        ScenarioKind::Rush => {
            let starts = now + chrono::Duration::seconds(i64::from(cfg.start_delay_secs));
            let sale = admin_post(
                &client,
                cfg,
                "/admin/v1/sales",
                &sale_body("rush", cfg.stock, starts, 600),
            )
            .await?;
            Ok((vec![id(&sale)?], starts))
        }
        ScenarioKind::SoldOutStorm => {
            let sale = admin_post(
                &client,
                cfg,
                "/admin/v1/sales",
                &sale_body("storm", 1, now - chrono::Duration::seconds(1), 600),
            )
            .await?;
            let sale_id = id(&sale)?;
            let token = cfg.tokens.first().ok_or_else(|| anyhow!("no tokens"))?;
            let res = client
                .post(format!("{}/api/v1/sales/{sale_id}/purchases", cfg.host))
                .bearer_auth(token)
                .send()
                .await?;
            if res.status() != 201 {
                bail!("could not sell the storm sale out: {}", res.status());
            }
            Ok((vec![sale_id], now))
        }
        ScenarioKind::Browse => {
            let mut ids = Vec::new();
            for i in 0..5 {
                let sale = admin_post(
                    &client,
                    cfg,
                    "/admin/v1/sales",
                    &sale_body(&format!("browse {i}"), 100, now, 600),
                )
                .await?;
                ids.push(id(&sale)?);
            }
            Ok((ids, now))
        }
        ScenarioKind::Lifecycle => {
            let sale = admin_post(
                &client,
                cfg,
                "/admin/v1/sales",
                &sale_body(
                    "lifecycle",
                    cfg.stock,
                    now - chrono::Duration::seconds(1),
                    cfg.reservation_ttl_secs,
                ),
            )
            .await?;
            Ok((vec![id(&sale)?], now))
        }
    }
}

type Step = Arc<
    dyn for<'r> Fn(
            &'r mut GooseUser,
            Arc<Shared>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = TransactionResult> + Send + 'r>,
        > + Send
        + Sync,
>;

fn transaction(shared: &Arc<Shared>, name: &str, step: Step) -> Transaction {
    let shared = shared.clone();
    Transaction::new(Arc::new(move |user| step(user, shared.clone()))).set_name(name)
}

/// A POST with no body as the buyer holding `token`, named for goose's tables.
async fn post_as(
    user: &mut GooseUser,
    path: &str,
    name: &str,
    token: &str,
) -> Result<goose::goose::GooseResponse, Box<TransactionError>> {
    let builder = user
        .get_request_builder(&GooseMethod::Post, path)?
        .bearer_auth(token);
    let request = GooseRequest::builder()
        .method(GooseMethod::Post)
        .path(path)
        .name(name)
        .set_request_builder(builder)
        .build();
    user.request(request).await
}

/// One purchase by the next buyer. Every answer the API documents counts as
/// a success for goose (409, 429 and 503 are normal answers in a flash
/// sale); anything else is a failure.
async fn purchase(
    user: &mut GooseUser,
    shared: &Shared,
    sale: Uuid,
    token: &str,
) -> Result<Option<Value>, Box<TransactionError>> {
    let path = format!("/api/v1/sales/{sale}/purchases");
    let mut goose = post_as(user, &path, "purchase", token).await?;
    let Ok(response) = goose.response else {
        return Ok(None);
    };
    let status = response.status().as_u16();
    shared.count(status);
    let body: Value = response.json().await.unwrap_or_default();
    match status {
        201 | 200 => {
            if let Some(id) = body["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) {
                if let Ok(mut c) = shared.created.lock() {
                    c.insert(id);
                }
            }
            Ok(Some(body))
        }
        409 | 429 | 503 => {
            user.set_success(&mut goose.request)?;
            Ok(None)
        }
        _ => {
            user.set_failure(
                &format!("unexpected {status}: {body}"),
                &mut goose.request,
                None,
                None,
            )?;
            Ok(None)
        }
    }
}

fn scenario_for(kind: ScenarioKind, shared: &Arc<Shared>) -> Scenario {
    let sale = shared.sale_ids.first().copied().unwrap_or_default();
    match kind {
        ScenarioKind::Rush => Scenario::new("rush")
            .register_transaction(
                transaction(
                    shared,
                    "wait for the start",
                    Arc::new(|_user, shared| {
                        Box::pin(async move {
                            let wait = (shared.sale_starts_at - Utc::now())
                                .to_std()
                                .unwrap_or_default();
                            tokio::time::sleep(wait).await;
                            Ok(())
                        })
                    }),
                )
                .set_on_start(),
            )
            .register_transaction(transaction(
                shared,
                "buy",
                Arc::new(move |user, shared| {
                    Box::pin(async move {
                        let token = shared.next_token().to_owned();
                        purchase(user, &shared, sale, &token).await.map(|_| ())
                    })
                }),
            )),
        ScenarioKind::SoldOutStorm => {
            Scenario::new("sold-out-storm").register_transaction(transaction(
                shared,
                "buy",
                Arc::new(move |user, shared| {
                    Box::pin(async move {
                        let token = shared.next_token().to_owned();
                        purchase(user, &shared, sale, &token).await.map(|_| ())
                    })
                }),
            ))
        }
        ScenarioKind::Browse => Scenario::new("browse").register_transaction(transaction(
            shared,
            "browse",
            Arc::new(|user, shared| {
                Box::pin(async move {
                    let list = user.get("/api/v1/sales").await?;
                    if let Ok(r) = &list.response {
                        shared.count(r.status().as_u16());
                    }
                    let i = shared.cursor.fetch_add(1, Ordering::Relaxed)
                        % shared.sale_ids.len().max(1);
                    if let Some(id) = shared.sale_ids.get(i) {
                        let one = user.get(&format!("/api/v1/sales/{id}")).await?;
                        if let Ok(r) = &one.response {
                            shared.count(r.status().as_u16());
                        }
                    }
                    Ok(())
                })
            }),
        )),
        ScenarioKind::Lifecycle => Scenario::new("lifecycle").register_transaction(transaction(
            shared,
            "reserve then pay, cancel or walk away",
            Arc::new(move |user, shared| {
                Box::pin(async move {
                    // The buyer who reserved pays, cancels or walks away.
                    let token = shared.next_token().to_owned();
                    let Some(order) = purchase(user, &shared, sale, &token).await? else {
                        return Ok(());
                    };
                    let Some(id) = order["id"].as_str() else {
                        return Ok(());
                    };
                    let action = match shared.cursor.load(Ordering::Relaxed) % 3 {
                        0 => "payment",
                        1 => "cancel",
                        _ => return Ok(()),
                    };
                    let path = format!("/api/v1/orders/{id}/{action}");
                    let mut goose = post_as(user, &path, action, &token).await?;
                    if let Ok(r) = &goose.response {
                        let status = r.status().as_u16();
                        shared.count(status);
                        if status == 409 || status == 503 {
                            user.set_success(&mut goose.request)?;
                        }
                    }
                    Ok(())
                })
            }),
        )),
    }
}

/// Runs one scenario with goose's `options`, then checks the invariants.
pub async fn run(cfg: RunConfig, mut options: GooseConfiguration) -> anyhow::Result<RunReport> {
    if cfg.tokens.is_empty() {
        bail!("no buyer tokens");
    }
    let (sale_ids, starts) = set_up(&cfg).await?;
    let shared = Arc::new(Shared {
        host: cfg.host.clone(),
        tokens: cfg.tokens.clone(),
        cursor: AtomicUsize::new(1),
        sale_ids: sale_ids.clone(),
        sale_starts_at: starts,
        created: Mutex::new(HashSet::new()),
        statuses: Mutex::new(BTreeMap::new()),
    });
    options.host = Some(shared.host.clone());
    options.no_telnet = true;
    let metrics = GooseAttack::initialize_with_config(options)?
        .register_scenario(scenario_for(cfg.scenario, &shared))
        .execute()
        .await?;
    let created: HashSet<Uuid> = shared.created.lock().map(|c| c.clone()).unwrap_or_default();
    let statuses = shared
        .statuses
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    check_invariants(&cfg, &sale_ids, &created).await?;
    Ok(RunReport {
        statuses,
        orders_created: created.len(),
        sale_ids,
        goose_requests: metrics
            .requests
            .values()
            .map(|r| r.success_count + r.fail_count)
            .sum(),
    })
}

/// After the run: every 201 is in PostgreSQL (waiting for the writers, up to
/// 60 s), no sale is oversold, no buyer is over the limit, and the admin
/// counters equal PostgreSQL's (waiting for expiries in flight to settle).
pub async fn check_invariants(
    cfg: &RunConfig,
    sale_ids: &[Uuid],
    created: &HashSet<Uuid>,
) -> anyhow::Result<()> {
    let (db, conn) = tokio_postgres::connect(&cfg.database_url, tokio_postgres::NoTls)
        .await
        .context("invariant check: PostgreSQL")?;
    tokio::spawn(conn);
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let ids: Vec<Uuid> = created.iter().copied().collect();
    loop {
        let found: i64 = db
            .query_one(
                "SELECT COUNT(*) FROM orders WHERE id = ANY($1) AND status <> 'void'",
                &[&ids],
            )
            .await?
            .get(0);
        if found as usize == ids.len() {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "{} of {} orders answered 201 are not in PostgreSQL",
                ids.len() - found as usize,
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for sale in sale_ids {
        let row = db
            .query_one(
                "SELECT s.stock_total, s.per_user_limit, \
                   COALESCE((SELECT SUM(quantity) FROM orders o WHERE o.sale_id = s.id AND o.status IN ('reserved','paid')), 0)::BIGINT, \
                   COALESCE((SELECT MAX(u) FROM (SELECT SUM(quantity) AS u FROM orders o WHERE o.sale_id = s.id AND o.status IN ('reserved','paid') GROUP BY user_id) x), 0)::BIGINT \
                 FROM sales s WHERE s.id = $1",
                &[sale],
            )
            .await?;
        let (stock, limit, held, most): (i32, i32, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if held > i64::from(stock) {
            bail!("sale {sale} oversold: {held} units held of {stock}");
        }
        if most > i64::from(limit) {
            bail!("sale {sale}: a buyer holds {most} units, the limit is {limit}");
        }
        loop {
            let rows = db
                .query("SELECT status, SUM(quantity)::BIGINT FROM orders WHERE sale_id = $1 AND status <> 'void' GROUP BY status", &[sale])
                .await?;
            let stored: BTreeMap<String, i64> = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect();
            let view: Value = client
                .get(format!("{}/admin/v1/sales/{sale}", cfg.host))
                .bearer_auth(&cfg.admin_token)
                .send()
                .await?
                .json()
                .await?;
            let agree = ["reserved", "paid", "expired", "cancelled"]
                .iter()
                .all(|s| view[*s].as_i64().unwrap_or(-1) == stored.get(*s).copied().unwrap_or(0));
            if agree {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("sale {sale}: admin counters {view} disagree with PostgreSQL {stored:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A short run of every scenario against a server started in-process on
    //! its own database and queues, so the scenarios never rot. Speed is
    //! asserted nowhere; the invariant check is.

    use flashsale::config::{Overrides, Settings};
    use flashsale::startup::Application;
    use secrecy::{ExposeSecret, SecretString};

    use super::*;

    async fn smoke(kind: ScenarioKind, stock: u32) -> RunReport {
        let mut s = Settings::load_without_env(None, &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let id = format!(
            "{}_{}",
            Utc::now().timestamp(),
            &Uuid::new_v4().simple().to_string()[..12]
        );
        s.server.port = 0;
        s.server.workers = 2;
        // The invariant check reads PostgreSQL: the scenarios run against
        // services mode.
        s.storage.mode = flashsale::config::StorageMode::Services;
        s.database.url = SecretString::from(format!(
            "postgres://postgres@127.0.0.1:5432/flashsale_test_{id}"
        ));
        s.database.pool_size = 4;
        s.redis.key_prefix = format!("flashsale_test:{id}");
        s.rabbitmq.queue = format!("flashsale.test.{id}.orders");
        s.rabbitmq.dead_letter_queue = format!("flashsale.test.{id}.dead");
        s.limits.per_ip_per_second = 0;
        s.limits.purchases_per_user_per_second = 0;
        s.auth.argon2_memory_kib = 256;
        s.auth.argon2_iterations = 1;
        let app = Application::build(s.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = app.port();
        let stop = app.shutdown_handle();
        let server = actix_web::rt::spawn(app.run_until_stopped());
        let keys = flashsale::auth::TokenKeys::new(&s.auth);
        let tokens = (0..300)
            .filter_map(|_| keys.issue(Uuid::new_v4()).ok().map(|(t, _)| t))
            .collect();
        let cfg = RunConfig {
            scenario: kind,
            host: format!("http://127.0.0.1:{port}"),
            admin_token: s.auth.admin_token.expose_secret().to_owned(),
            tokens,
            database_url: s.database.url.expose_secret().to_owned(),
            stock,
            start_delay_secs: 1,
            reservation_ttl_secs: 1,
        };
        let mut options = GooseConfiguration::default();
        options.users = Some(8);
        options.increase_rate = Some("8".into());
        options.run_time = Some("3".into());
        options.quiet = 1;
        options.no_print_metrics = true;
        let report = run(cfg, options).await;
        stop.stop();
        let _ = server.await;
        // Leave nothing behind.
        if let Ok((db, conn)) = tokio_postgres::connect(
            "postgres://postgres@127.0.0.1:5432/postgres",
            tokio_postgres::NoTls,
        )
        .await
        {
            actix_web::rt::spawn(conn);
            let _ = db
                .simple_query(&format!(
                    "DROP DATABASE IF EXISTS flashsale_test_{id} WITH (FORCE)"
                ))
                .await;
        }
        if let Ok(conn) =
            flashsale::persistence::rabbit::connect(&s.rabbitmq, "smoke-cleanup").await
        {
            if let Ok(ch) = conn.create_channel().await {
                for q in [&s.rabbitmq.queue, &s.rabbitmq.dead_letter_queue] {
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                let _ = ch
                    .exchange_delete(
                        s.rabbitmq.dead_letter_queue.as_str().into(),
                        Default::default(),
                    )
                    .await;
            }
            let _ = conn.close(200, "done".into()).await;
        }
        report.unwrap_or_else(|e| panic!("{kind:?}: {e:#}"))
    }

    #[actix_web::test]
    async fn rush_sells_exactly_the_stock() {
        let r = smoke(ScenarioKind::Rush, 40).await;
        assert_eq!(r.orders_created, 40, "{r:?}");
        assert!(
            r.statuses.get(&409).copied().unwrap_or(0) > 0,
            "the rush ran past the stock: {r:?}"
        );
    }

    #[actix_web::test]
    async fn a_sold_out_storm_sells_nothing() {
        let r = smoke(ScenarioKind::SoldOutStorm, 1).await;
        assert_eq!(r.orders_created, 0);
        assert!(r.statuses.get(&409).copied().unwrap_or(0) > 100, "{r:?}");
        assert_eq!(
            r.statuses.keys().copied().collect::<Vec<_>>(),
            vec![409],
            "{r:?}"
        );
    }

    #[actix_web::test]
    async fn browsing_reads_the_catalogue() {
        let r = smoke(ScenarioKind::Browse, 1).await;
        assert_eq!(r.sale_ids.len(), 5);
        assert!(r.statuses.get(&200).copied().unwrap_or(0) > 10, "{r:?}");
        assert_eq!(r.statuses.len(), 1, "only 200s: {r:?}");
    }

    #[actix_web::test]
    async fn the_lifecycle_pays_cancels_and_expires() {
        let r = smoke(ScenarioKind::Lifecycle, 30).await;
        assert!(r.orders_created > 0, "{r:?}");
        assert!(
            r.statuses.get(&200).copied().unwrap_or(0) > 0,
            "payments or cancellations: {r:?}"
        );
    }
}
