//! Building and running the application: one path for the binary and tests.
//!
//! [`Application::build`] connects to the services, applies migrations,
//! recovers state and binds the listener (port 0 picks a free one, which
//! tests use). [`Application::run_until_stopped`] serves until SIGINT,
//! SIGTERM or [`ShutdownHandle::stop`], then runs the shutdown script.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use actix_web::dev::{Server, ServerHandle};
use actix_web::rt::task::JoinHandle;
use actix_web::{web, App, HttpServer};
use tokio::sync::Notify;

use crate::actors::registry::SaleRegistry;
use crate::actors::stock::{Reopen, StockActor, StockDeps};
use crate::auth::{AdminToken, PasswordPool, Passwords, TokenKeys};
use crate::breaker::Breakers;
use crate::config::{RabbitSettings, Settings, StorageMode};
use crate::http::json::BodyLimit;
use crate::http::limits::RateLimits;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::order_log::drain::{drain_queue, wait_drained, DrainProgress};
use crate::order_log::sink::{OrderPublisher, PublisherDeps, RabbitSink, SqliteSink};
use crate::order_log::writer::{OrderWriter, StopWriter, WriterConfig, WriterStats};
use crate::persistence::postgres::PostgresStore;
use crate::persistence::redis::RedisStore;
use crate::persistence::sqlite::SqliteStore;
use crate::persistence::store::SharedStore;
use crate::persistence::{rabbit, Unreachable};
use crate::state_metrics::StateCollector;
use prometheus_client::registry::Registry;

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    #[error("cannot listen on {address} (check `server.host` and `server.port`): {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Asks a running application to shut down gracefully.
#[derive(Clone, Default)]
pub struct ShutdownHandle(Arc<Notify>);

impl ShutdownHandle {
    pub fn stop(&self) {
        self.0.notify_one();
    }
}

pub struct Application {
    port: u16,
    /// The running HTTP server: its handle and its task.
    server: (ServerHandle, JoinHandle<std::io::Result<()>>),
    state: web::Data<AppState>,
    shutdown: ShutdownHandle,
    pipeline: Pipeline,
}

/// The order pipeline's moving parts, kept for the shutdown script.
struct Pipeline {
    publisher: OrderPublisher,
    publisher_task: tokio::sync::oneshot::Receiver<()>,
    /// The writers from RabbitMQ into PostgreSQL (services mode; none in
    /// embedded mode, where a confirmed batch is already in the store).
    writers: Vec<Addr<OrderWriter>>,
    writer_stats: Arc<WriterStats>,
    /// The broker the writers drain at shutdown (services mode).
    rabbit: Option<RabbitSettings>,
    /// The stock actors' and the publisher's thread.
    arbiter: actix::Arbiter,
    /// The order writers' thread (idle in embedded mode).
    writer_arbiter: actix::Arbiter,
    shutdown_timeout: Duration,
}

impl Application {
    /// Starts everything, in the order recovery needs:
    ///
    /// 1. connect to the services (exit with a clear line if one is away);
    /// 2. start the publisher, and every sale's stock actor *closed*, its
    ///    book read from PostgreSQL (for reads only);
    /// 3. bind the listener and serve: reads work, `/readyz` says
    ///    `recovering` with the messages left, purchases and changes get 503;
    /// 4. drain the order queue into PostgreSQL, however long it takes;
    /// 5. reopen every sale with its book rebuilt from the whole log, start
    ///    the order writers, and turn ready.
    ///
    /// Returns once ready, so tests and the binary get a serving application.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        check_secrets(&settings)?;
        let mode = settings.storage.mode;
        let storage = Storage::open(&settings).await?;
        let store = storage.store.clone();

        let writer_stats = Arc::new(WriterStats::default());
        let breakers = Arc::new(Breakers::new(
            settings.breakers.failure_threshold,
            Duration::from_millis(settings.breakers.open_ms),
            mode,
        ));
        let limits = RateLimits::new(&settings.limits).map_err(StartupError::Config)?;
        let mut metrics_registry = Registry::with_prefix(crate::metrics::name::PREFIX);
        let metrics = Metrics::register(&mut metrics_registry);
        let registry = Arc::new(SaleRegistry::default());
        let writer_config = match mode {
            StorageMode::Embedded => None,
            StorageMode::Services => Some(WriterConfig {
                directory: registry.clone(),
                metrics: metrics.clone(),
                breakers: breakers.clone(),
                rabbit: settings.rabbitmq.clone(),
                orders: settings.orders.clone(),
                database: crate::persistence::postgres::session_config(&settings.database)
                    .map_err(|e| StartupError::Config(format!("database.url: {e}")))?,
            }),
        };
        let writer_count = if writer_config.is_some() {
            settings.orders.writers
        } else {
            0
        };

        // The stock actors and the publisher share one thread of their own;
        // the writers have another (see ARCHITECTURE.md, "Threads").
        let pipeline_arbiter = actix::Arbiter::new();
        let writer_arbiter = actix::Arbiter::new();
        pipeline_arbiter.spawn_fn(|| crate::telemetry::name_current_thread("fs-pipeline"));
        writer_arbiter.spawn_fn(|| crate::telemetry::name_current_thread("fs-writers"));
        let publisher_deps = PublisherDeps {
            orders: settings.orders.clone(),
            store: store.clone(),
            writers: writer_stats.clone(),
            metrics: metrics.clone(),
            breakers: breakers.clone(),
        };
        let (publisher, publisher_task) = match &storage.sqlite {
            Some(sqlite) => OrderPublisher::start(
                &pipeline_arbiter.handle(),
                SqliteSink {
                    store: sqlite.clone(),
                },
                publisher_deps,
            ),
            None => OrderPublisher::start(
                &pipeline_arbiter.handle(),
                RabbitSink {
                    settings: settings.rabbitmq.clone(),
                },
                publisher_deps,
            ),
        };
        let stock = StockDeps {
            registry: registry.clone(),
            publisher: publisher.clone(),
            store: store.clone(),
            snapshots: storage.redis.clone(),
            mailbox_capacity: settings.stock.mailbox_capacity,
            snapshot_interval: Duration::from_millis(settings.stock.snapshot_interval_ms.max(1)),
            expiry_tick: Duration::from_millis(settings.stock.expiry_tick_ms.max(1)),
            idle_stop_after: Duration::from_secs(settings.stock.idle_stop_after_secs),
            publish_interval: Duration::from_millis(settings.events.publish_interval_ms.max(10)),
            breakers: breakers.clone(),
            arbiter: pipeline_arbiter.handle(),
        };
        let opened = start_sales_closed(&store, &stock).await?;

        metrics_registry.register_collector(Box::new(StateCollector {
            sales: registry.clone(),
            publisher: publisher.clone(),
            writers: writer_stats.clone(),
            breakers: breakers.clone(),
        }));
        let passwords = Passwords::new(&settings.auth)
            .map_err(|e| StartupError::Config(format!("auth.argon2_*: {e}")))?;
        let passwords = PasswordPool::start(
            passwords,
            settings.auth.password_hash_threads,
            settings.auth.password_hash_queue,
        )
        .map_err(|e| StartupError::Config(format!("cannot start the password hashers: {e}")))?;
        let state = web::Data::new(AppState {
            mode,
            store: store.clone(),
            registry,
            stock,
            publisher: publisher.clone(),
            writers: writer_stats.clone(),
            tokens: TokenKeys::new(&settings.auth),
            passwords,
            admin_token: AdminToken::new(settings.auth.admin_token.clone()),
            sales_defaults: settings.sales.clone(),
            payments: crate::payments::provider(&settings.payments),
            metrics,
            metrics_registry,
            limits,
            breakers,
            max_queue_depth: settings.orders.max_queue_depth,
            max_header_bytes: settings.server.max_header_bytes,
            max_body_bytes: settings.server.max_body_bytes,
            body_timeout: Duration::from_millis(settings.server.client_request_timeout_ms),
            writer_pool_size: writer_count,
            webhook: crate::payments::WebhookVerifier::new(&settings.payments),
            readiness: Default::default(),
            readiness_cache: Duration::from_millis(settings.server.readiness_cache_ms),
            recovered: AtomicBool::new(false),
            recovery: Arc::new(DrainProgress::default()),
            stopping: AtomicBool::new(false),
            retry_after_secs: settings.stock.retry_after_secs,
            confirm_timeout: Duration::from_millis(settings.orders.confirm_timeout_ms.max(1)),
            streams: http::events::StreamSlots::new(&settings.events),
            events: http::events::EventTimings::new(&settings.events),
            event_tickets: http::events::TicketKey::random(),
            pages: http::pages::Pages::default(),
        });
        // Orders PostgreSQL holds leave the in-memory directory.
        let evict_after = Duration::from_secs(settings.orders.directory_evict_after_secs.max(1));
        actix::spawn(forget_stored_orders(state.clone(), evict_after));
        // Rate-limit keys that are idle again are forgotten now and then.
        let evicting = state.clone();
        let every = Duration::from_secs(settings.limits.evict_interval_secs.max(1));
        actix::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let (ips, users) = evicting.limits.evict_idle();
                tracing::debug!(ips, users, "rate-limit keys kept");
            }
        });

        let (server, port) = serve(&settings, state.clone())?;
        let handle = server.handle();
        let serving = actix_web::rt::spawn(server);
        tracing::info!(port, "flashsale listening; recovering the order log");

        // Recovery (services mode): the whole log into PostgreSQL, then the
        // books from it. In embedded mode a confirmed batch is in the store
        // already, so the books read at start are the whole log.
        let drained = match &writer_config {
            Some(config) => {
                drain_queue(
                    config,
                    &writer_stats,
                    Duration::from_secs(settings.orders.recovery_drain_warn_secs),
                    &state.recovery,
                )
                .await
            }
            None => 0,
        };
        if drained > 0 {
            tracing::info!(
                messages = drained,
                "recovery: order log drained into PostgreSQL"
            );
        }
        reopen_sales(&store, &state.registry, opened, drained > 0).await;

        let writers = writer_config
            .iter()
            .flat_map(|config| {
                (0..writer_count).map(|i| {
                    let writer = OrderWriter::new(i, config.clone(), writer_stats.clone());
                    OrderWriter::start_in_arbiter(&writer_arbiter.handle(), move |_| writer)
                })
            })
            .collect();
        // Open for business once the pipeline is connected.
        wait_for_pipeline(
            &publisher,
            &writer_stats,
            writer_count,
            Duration::from_millis(settings.rabbitmq.connect_timeout_ms * 2),
        )
        .await;
        state.recovered.store(true, Ordering::Release);
        match &storage.sqlite {
            Some(sqlite) => tracing::info!(
                port,
                data = %sqlite.path().display(),
                "flashsale ready in embedded mode: orders, sales and users are in this SQLite file; for PostgreSQL, RabbitMQ and Redis run with --config deploy/services.toml or FLASHSALE__STORAGE__MODE=services"
            ),
            None => tracing::info!(port, "flashsale ready in services mode"),
        }
        Ok(Application {
            port,
            server: (handle, serving),
            state,
            shutdown: ShutdownHandle::default(),
            pipeline: Pipeline {
                publisher,
                publisher_task,
                writers,
                writer_stats,
                rabbit: writer_config.map(|c| c.rabbit),
                arbiter: pipeline_arbiter,
                writer_arbiter,
                shutdown_timeout: Duration::from_secs(settings.server.shutdown_timeout_secs),
            },
        })
    }

    /// The port the server listens on (the real one when 0 was asked for).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until a signal or the shutdown handle, then shuts down in order.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Application {
            server: (handle, mut serving),
            state,
            shutdown,
            mut pipeline,
            ..
        } = self;
        tokio::select! {
            result = &mut serving => {
                return result.map_err(std::io::Error::other)?;
            }
            reason = wait_for_stop(&shutdown) => {
                tracing::info!(reason, "shutting down");
            }
        }
        let started = tokio::time::Instant::now();
        // 1. Stop admitting purchases (they get 503 with Retry-After).
        state.stopping.store(true, Ordering::Release);
        // 2. Stop accepting connections; in-flight requests, including
        //    purchases waiting for their confirm, finish (actix-web gives
        //    them `server.shutdown_timeout_secs`).
        handle.stop(true).await;
        let _ = serving.await;
        // 3-5. The pipeline, within what is left of the same time-out plus
        //    a margin: a broker or database that stalls must not hold the
        //    process. What is not written by then stays in RabbitMQ (unacked
        //    deliveries go back to the queue when the connections close),
        //    where the next start's recovery finds it.
        let deadline = started + pipeline.shutdown_timeout + SHUTDOWN_MARGIN;
        let finished = tokio::time::timeout_at(deadline, stop_pipeline(&mut pipeline)).await;
        if finished.is_err() {
            tracing::warn!(
                "order pipeline not stopped in time; what is not yet written stays in RabbitMQ for the next start"
            );
        }
        pipeline.arbiter.stop();
        pipeline.writer_arbiter.stop();
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// What the shutdown script may take past `server.shutdown_timeout_secs`.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// Flushes the publisher (every confirm in), lets the writers drain the
/// queue into PostgreSQL, and stops them.
async fn stop_pipeline(pipeline: &mut Pipeline) {
    // 3. Publish what is queued and wait for every confirm.
    pipeline.publisher.shutdown();
    let _ = (&mut pipeline.publisher_task).await;
    // 4. Let the writers drain the queue into PostgreSQL and ack (services
    //    mode; in embedded mode every confirmed batch is in the store).
    let Some(broker) = &pipeline.rabbit else {
        return;
    };
    let drained = match rabbit::open(broker, "flashsale-shutdown").await {
        Ok((conn, channel)) => {
            let drained = wait_drained(
                &channel,
                &broker.queue,
                &pipeline.writer_stats,
                Duration::from_secs(10),
            )
            .await;
            rabbit::close(&conn, "shutdown").await;
            drained
        }
        Err(_) => false,
    };
    if !drained {
        tracing::warn!("order queue not drained at shutdown; the next start drains it");
    }
    // 5. Stop the writers and close their connections.
    for w in &pipeline.writers {
        let _ = w.send(StopWriter).await;
    }
}

/// Refuses to serve beyond this machine with a secret anyone could know;
/// on loopback only, warns once for each.
fn check_secrets(settings: &Settings) -> Result<(), StartupError> {
    let weak = settings.weak_secrets();
    if weak.is_empty() {
        return Ok(());
    }
    let named = weak
        .iter()
        .map(|w| format!("{} {}", w.key, w.why))
        .collect::<Vec<_>>()
        .join("; ");
    if !settings.loopback_only() {
        return Err(StartupError::Config(format!(
            "refusing to listen on {} with weak secrets: {named}. `flashsale secrets` prints fresh values",
            settings.server.host
        )));
    }
    for w in &weak {
        tracing::warn!(
            key = w.key,
            "{} {}: fine on loopback, refused on any other address (`flashsale secrets` prints fresh values)",
            w.key,
            w.why
        );
    }
    Ok(())
}

/// The store and the services of the storage mode, opened (start-up fails
/// clearly naming the one that cannot be reached).
struct Storage {
    store: SharedStore,
    /// Embedded mode: the SQLite file, also the order log's sink.
    sqlite: Option<SqliteStore>,
    /// Services mode: Redis, for snapshots.
    redis: Option<RedisStore>,
}

impl Storage {
    async fn open(settings: &Settings) -> Result<Self, StartupError> {
        match settings.storage.mode {
            StorageMode::Embedded => {
                let sqlite = SqliteStore::open(&settings.storage).await?;
                Ok(Storage {
                    store: Arc::new(sqlite.clone()),
                    sqlite: Some(sqlite),
                    redis: None,
                })
            }
            StorageMode::Services => {
                let db = PostgresStore::connect(&settings.database).await?;
                let redis = RedisStore::connect(&settings.redis).await?;
                // The broker, with the topology declared so that recovery's
                // drain has a queue to read.
                let (conn, _) = rabbit::open(&settings.rabbitmq, "flashsale-startup").await?;
                rabbit::close(&conn, "checked").await;
                Ok(Storage {
                    store: Arc::new(db),
                    sqlite: None,
                    redis: Some(redis),
                })
            }
        }
    }
}

/// Every `every`, looks up in PostgreSQL the directory's orders at least
/// that old and forgets those it holds in the same state. PostgreSQL away:
/// they stay, and are looked at again next time.
async fn forget_stored_orders(state: web::Data<AppState>, every: Duration) {
    const CHUNK: usize = 10_000;
    loop {
        tokio::time::sleep(every).await;
        let candidates = state.registry.orders.older_than(every, 50 * CHUNK);
        for chunk in candidates.chunks(CHUNK) {
            let ids: Vec<uuid::Uuid> = chunk.iter().map(|o| o.id).collect();
            let stored = match state.store.order_statuses(&ids).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "order directory: PostgreSQL not asked this time");
                    break;
                }
            };
            let written: Vec<_> = chunk
                .iter()
                .filter(|o| stored.get(&o.id).map(String::as_str) == Some(o.status.as_str()))
                .cloned()
                .collect();
            state.registry.orders.forget_stored(&written);
        }
    }
}

/// Binds the listener and builds the HTTP server (not yet running).
fn serve(settings: &Settings, state: web::Data<AppState>) -> Result<(Server, u16), StartupError> {
    let server_settings = &settings.server;
    let address = format!("{}:{}", server_settings.host, server_settings.port);
    let bind_error = |source| StartupError::Bind {
        address: address.clone(),
        source,
    };
    let listener = TcpListener::bind(&address).map_err(bind_error)?;
    let port = listener.local_addr().map_err(bind_error)?.port();
    let workers = match server_settings.workers {
        0 => std::thread::available_parallelism().map_or(2, usize::from),
        n => n,
    };
    let limit = BodyLimit(server_settings.max_body_bytes);
    let token_cache = settings.auth.token_cache_per_worker;
    let webhook = settings.payments.provider == crate::config::PaymentProviderKind::Webhook;
    let server = HttpServer::new(move || {
        // Runs once on each worker's thread.
        crate::telemetry::name_current_thread("fs-http");
        App::new()
            .app_data(state.clone())
            .app_data(limit)
            .app_data(http::auth::TokenCache::new(token_cache))
            .app_data(http::purchases::PurchaseOutbox::default())
            .configure(|cfg| http::routes(cfg, webhook))
            .wrap_fn(http::edge_guard)
            .wrap_fn(http::request_context)
    })
    .workers(workers)
    .backlog(server_settings.backlog)
    .max_connections(server_settings.max_connections_per_worker)
    .client_request_timeout(Duration::from_millis(
        server_settings.client_request_timeout_ms,
    ))
    .keep_alive(Duration::from_secs(server_settings.keep_alive_secs))
    .shutdown_timeout(server_settings.shutdown_timeout_secs)
    .disable_signals()
    .listen(listener)
    .map_err(bind_error)?
    .run();
    Ok((server, port))
}

/// Every sale's stock actor, started closed with the book PostgreSQL holds
/// now (what readers see while the log drains). Returns their ids.
async fn start_sales_closed(
    store: &SharedStore,
    stock: &StockDeps,
) -> Result<Vec<uuid::Uuid>, StartupError> {
    let failed = |e: crate::persistence::store::StoreError| {
        StartupError::Config(format!(
            "recovery could not read the store ({}): {e}",
            store.engine()
        ))
    };
    let sales = store.list_sales().await.map_err(failed)?;
    let ids = sales.iter().map(|s| s.id).collect();
    for (_, book) in store.restore_books(sales).await.map_err(failed)? {
        StockActor::launch(book, stock, false);
    }
    Ok(ids)
}

/// Opens the sales started closed, once the log is in PostgreSQL: with the
/// books rebuilt from it when the drain wrote anything (PostgreSQL is read
/// again until it answers), else with the books read at start.
async fn reopen_sales(
    store: &SharedStore,
    registry: &SaleRegistry,
    ids: Vec<uuid::Uuid>,
    reread: bool,
) {
    let mut books = if reread {
        let sales: Vec<_> = ids
            .iter()
            .filter_map(|id| registry.get(*id))
            .map(|h| h.shared.sale().as_ref().clone())
            .collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.restore_books(sales.clone()).await {
                Ok(all) => break Some(all),
                Err(e) => {
                    tracing::warn!(error = %e, "recovery: cannot read the orders back yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    } else {
        None
    };
    let count = ids.len();
    for id in ids {
        let Some(addr) = registry.get(id).and_then(|h| h.addr()) else {
            continue;
        };
        let book = books.as_mut().and_then(|b| b.remove(&id));
        let _ = addr.send(Reopen { book }).await;
    }
    tracing::info!(sales = count, "recovery: every sale open");
}

/// Waits (bounded) until the publisher and every writer are connected.
async fn wait_for_pipeline(
    publisher: &OrderPublisher,
    writers: &WriterStats,
    writer_count: usize,
    timeout: Duration,
) {
    let up = || publisher.is_up() && writers.connected.load(Ordering::Acquire) >= writer_count;
    let deadline = tokio::time::Instant::now() + timeout;
    while !up() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !up() {
        tracing::warn!("order pipeline not fully connected yet; purchases answer 503 until it is");
    }
}

async fn wait_for_stop(handle: &ShutdownHandle) -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                handle.0.notified().await;
                return "shutdown requested";
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = handle.0.notified() => "shutdown requested",
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = handle.0.notified() => "shutdown requested",
        }
    }
}

/// Creates the store (the SQLite file, or the PostgreSQL database if
/// configured to) and applies the migrations, alone.
pub async fn migrate(settings: &Settings) -> Result<(), StartupError> {
    match settings.storage.mode {
        StorageMode::Embedded => drop(SqliteStore::open(&settings.storage).await?),
        StorageMode::Services => drop(PostgresStore::connect(&settings.database).await?),
    }
    Ok(())
}
