//! Building and running the application: one path for the binary and tests.
//!
//! [`Application::build`] connects to the services, applies migrations,
//! recovers state and binds the listener (port 0 picks a free one, which
//! tests use). [`Application::run_until_stopped`] serves until SIGINT,
//! SIGTERM or [`ShutdownHandle::stop`], then runs the shutdown script.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{middleware, web, App, HttpServer};
use tokio::sync::Notify;

use crate::auth::{AdminToken, Passwords, TokenKeys};
use crate::config::Settings;
use crate::http::json::BodyLimit;
use crate::http::{self, AppState};
use crate::persistence::postgres::Database;
use crate::persistence::redis::RedisStore;
use crate::persistence::{rabbit, Unreachable};

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
    server: Server,
    state: web::Data<AppState>,
    shutdown: ShutdownHandle,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let db = Database::connect(&settings.database).await?;
        let redis = RedisStore::connect(&settings.redis).await?;
        let rabbit = rabbit::connect(&settings.rabbitmq, "flashsale").await?;
        let unreachable_rabbit = |e: lapin::Error| {
            Unreachable::new(
                "RabbitMQ",
                crate::persistence::redact_url(secrecy::ExposeSecret::expose_secret(
                    &settings.rabbitmq.url,
                )),
                "rabbitmq.url",
                e,
            )
        };
        let channel = rabbit.create_channel().await.map_err(unreachable_rabbit)?;
        rabbit::declare_topology(&channel, &settings.rabbitmq)
            .await
            .map_err(unreachable_rabbit)?;

        let passwords = Passwords::new(&settings.auth)
            .map_err(|e| StartupError::Config(format!("auth.argon2_*: {e}")))?;
        let state = web::Data::new(AppState {
            db,
            redis,
            rabbit,
            tokens: TokenKeys::new(&settings.auth),
            passwords,
            admin_token: AdminToken::new(settings.auth.admin_token.clone()),
            sales_defaults: settings.sales.clone(),
            recovered: Default::default(),
        });
        // Nothing to recover before the order pipeline exists.
        state.recovered.store(true, Ordering::Release);

        let server_settings = &settings.server;
        let address = format!("{}:{}", server_settings.host, server_settings.port);
        let listener = TcpListener::bind(&address).map_err(|source| StartupError::Bind {
            address: address.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                address: address.clone(),
                source,
            })?
            .port();
        let workers = match server_settings.workers {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        };
        let limit = BodyLimit(server_settings.max_body_bytes);
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .app_data(limit)
                .configure(http::routes)
                .wrap(middleware::NormalizePath::trim())
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
        .map_err(|source| StartupError::Bind { address, source })?
        .run();
        tracing::info!(port, workers, "flashsale listening");
        Ok(Application {
            port,
            server,
            state,
            shutdown: ShutdownHandle::default(),
        })
    }

    /// The port the server listens on (the real one when 0 was asked for).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until a signal or the shutdown handle, then shuts down in order:
    /// stop accepting and finish in-flight requests, then close the services.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Application {
            server,
            state,
            shutdown,
            ..
        } = self;
        let handle = server.handle();
        let mut serving = actix_web::rt::spawn(server);
        tokio::select! {
            result = &mut serving => {
                return result.map_err(std::io::Error::other)?;
            }
            reason = wait_for_stop(&shutdown) => {
                tracing::info!(reason, "shutting down");
            }
        }
        // 1. Stop accepting connections; let in-flight requests finish.
        handle.stop(true).await;
        let _ = serving.await;
        // 2. Close the broker connection cleanly.
        if let Err(e) = state.rabbit.close(200, "shutdown".into()).await {
            tracing::warn!(error = %e, "closing the RabbitMQ connection failed");
        }
        tracing::info!("shutdown complete");
        Ok(())
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

/// Creates the database if configured to and applies the migrations, alone.
pub async fn migrate(settings: &Settings) -> Result<(), StartupError> {
    Database::connect(&settings.database).await?;
    Ok(())
}
