//! The HTTP boundary: routing, extractors, the request-id/tracing middleware
//! and the mapping of errors to problem answers.
//!
//! Handlers are thin: they authenticate, validate, call the domain, the
//! actors or the stores, and shape the answer. They never decide stock.

pub mod admin;
pub mod auth;
pub mod error;
pub mod events;
pub mod health;
pub mod json;
pub mod limits;
pub mod openapi;
pub mod pages;
pub mod payments;
pub mod purchases;
pub mod sales;
pub mod users;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpMessage, HttpResponse};
use tracing::Instrument;

use self::error::ApiError;
use crate::actors::registry::{SaleHandle, SaleRegistry};
use crate::actors::stock::{StockActor, StockDeps};
use crate::auth::{AdminToken, PasswordPool, TokenKeys};
use crate::config::SalesSettings;
use crate::config::StorageMode;
use crate::metrics::{route_label, HttpLabels, Metrics, RouteLabels};
use crate::order_log::sink::OrderPublisher;
use crate::order_log::writer::WriterStats;
use crate::payments::{PaymentProvider, WebhookVerifier};
use crate::persistence::store::SharedStore;

/// What every handler may reach. Built once by `Application::build`.
pub struct AppState {
    pub mode: StorageMode,
    pub store: SharedStore,
    pub registry: Arc<SaleRegistry>,
    /// What a new stock actor needs (admin create starts one).
    pub stock: StockDeps,
    pub publisher: OrderPublisher,
    pub writers: Arc<WriterStats>,
    pub tokens: TokenKeys,
    pub passwords: PasswordPool,
    pub admin_token: AdminToken,
    pub sales_defaults: SalesSettings,
    pub payments: Box<dyn PaymentProvider>,
    pub webhook: WebhookVerifier,
    pub metrics: Arc<Metrics>,
    pub limits: limits::RateLimits,
    pub breakers: Arc<crate::breaker::Breakers>,
    /// Admission control: past this many batches appended and not yet in
    /// the store (messages waiting in RabbitMQ),
    /// purchases are refused before any work.
    pub max_queue_depth: u32,
    pub max_header_bytes: usize,
    /// Largest body read (`server.max_body_bytes`), and how long a refused
    /// request's body may take to arrive (`server.client_request_timeout_ms`).
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    /// Read by `/metrics`; nothing registers after start-up.
    pub metrics_registry: prometheus_client::registry::Registry,
    pub writer_pool_size: usize,
    /// The services' last checks, reused for `readiness_cache`.
    pub readiness: health::ReadinessCache,
    pub readiness_cache: Duration,
    /// Set once start-up recovery has finished; `/readyz` waits for it.
    pub recovered: AtomicBool,
    /// How far recovery's drain of the order log has come.
    pub recovery: Arc<crate::order_log::drain::DrainProgress>,
    /// Set when shutdown begins: purchases are refused from then on.
    pub stopping: AtomicBool,
    pub retry_after_secs: u32,
    /// How long a purchase waits for the order log to confirm its order.
    pub confirm_timeout: Duration,
    /// Open event streams, bounded (`[events]`).
    pub streams: Arc<events::StreamSlots>,
    pub events: events::EventTimings,
    /// Signs the tickets that open the admin event stream.
    pub event_tickets: events::TicketKey,
    /// The shop page and the admin dashboard, embedded.
    pub pages: pages::Pages,
}

impl AppState {
    /// Purchases are taken only when recovered, not stopping, and the order
    /// log is connected: nothing is acknowledged that cannot be made durable.
    pub fn accepting_purchases(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
            && !self.stopping.load(Ordering::Acquire)
            && self.publisher.is_up()
    }

    /// Refuses work up front when the order pipeline lags past its bound.
    pub fn admit_purchase(&self) -> Result<(), ApiError> {
        let depth = self.publisher.stats().queue_depth.load(Ordering::Relaxed);
        if depth > self.max_queue_depth {
            return Err(ApiError::Overloaded {
                retry_after_secs: self.retry_after_secs,
            });
        }
        Ok(())
    }

    pub fn pipeline_health(&self) -> Result<(), String> {
        if !self.publisher.is_up() {
            let why = self
                .publisher
                .stats()
                .last_error()
                .unwrap_or_else(|| "not connected".into());
            return Err(format!("the order log is not open: {why}"));
        }
        if self.writer_pool_size > 0 && self.writers.connected.load(Ordering::Relaxed) == 0 {
            return Err("no order writer is connected to RabbitMQ".to_owned());
        }
        Ok(())
    }

    pub fn recovery_status(&self) -> String {
        if self.stopping.load(Ordering::Acquire) {
            "shutting down".to_owned()
        } else if self.recovered.load(Ordering::Acquire) {
            "ok".to_owned()
        } else {
            format!(
                "recovering: {} order-log messages left to drain into PostgreSQL, {} drained",
                self.recovery.left.load(Ordering::Acquire),
                self.recovery.handled.load(Ordering::Acquire)
            )
        }
    }

    /// Start-up recovery is still draining the order log.
    pub fn recovering(&self) -> bool {
        !self.recovered.load(Ordering::Acquire) && !self.stopping.load(Ordering::Acquire)
    }

    /// The sale's actor, started again if it had stopped (its sale ended):
    /// the start goes on in a task of its own, so a caller that gives up
    /// after `orders.confirm_timeout_ms` leaves it to finish for the next one.
    pub async fn running_actor(
        &self,
        handle: &Arc<SaleHandle>,
    ) -> Result<actix::Addr<StockActor>, ApiError> {
        let (handle, deps) = (handle.clone(), self.stock.clone());
        let start = tokio::spawn(async move { StockActor::running(&handle, &deps).await });
        match tokio::time::timeout(self.confirm_timeout, start).await {
            Ok(Ok(Ok(addr))) => Ok(addr),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(_)) | Err(_) => Err(ApiError::Unavailable {
                reason: "the sale is starting",
                retry_after_secs: self.retry_after_secs,
            }),
        }
    }
}

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's address as the edge worked it out (the peer, or what a
/// trusted proxy forwarded), for the limits handlers apply.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub std::net::IpAddr);

/// The request id: the client's when it sent a sane one, else a fresh one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn request_id_of(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

/// The edge: oversized headers get 431 `headers_too_large`; then the per-IP
/// rate limit on every route but health, readiness and metrics gives 429
/// `rate_limited` with `Retry-After`. Both before any other work.
pub fn edge_guard<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> futures_util::future::LocalBoxFuture<
    'static,
    Result<ServiceResponse<EitherBody<B>>, actix_web::Error>,
>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    S::Future: 'static,
    B: 'static,
{
    let limited = (|| {
        let state = req.app_data::<web::Data<AppState>>()?;
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        if header_bytes > state.max_header_bytes {
            return Some(ApiError::HeadersTooLarge {
                limit: state.max_header_bytes,
            });
        }
        if matches!(req.path(), "/healthz" | "/readyz" | "/metrics") {
            return None;
        }
        let forwarded = || {
            req.headers()
                .get_all("x-forwarded-for")
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        let ip = state
            .limits
            .client_ip(req.peer_addr().map(|a| a.ip()), forwarded)?;
        req.extensions_mut().insert(ClientIp(ip));
        state
            .limits
            .check_ip(ip)
            .err()
            .map(|retry_after_secs| ApiError::RateLimited { retry_after_secs })
    })();
    match limited {
        Some(refusal) => {
            // The body is read and dropped so the connection stays open: a
            // refusal must cost the server less than serving, and the
            // client no new connection.
            let (limit, within) = req
                .app_data::<web::Data<AppState>>()
                .map_or((0, Duration::ZERO), |s| (s.max_body_bytes, s.body_timeout));
            let (http_req, mut payload) = req.into_parts();
            Box::pin(async move {
                json::discard_body(&mut payload, limit, within).await;
                let res = actix_web::ResponseError::error_response(&refusal);
                Ok(ServiceResponse::new(http_req, res).map_into_right_body())
            })
        }
        None => {
            let fut = srv.call(req);
            Box::pin(async move { fut.await.map(ServiceResponse::map_into_left_body) })
        }
    }
}

/// Wraps every request in a span carrying its id, and echoes the id back.
pub fn request_context<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>> + 'static
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    S::Future: 'static,
{
    let id = request_id_of(&req);
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.path(),
        request_id = %id,
        sale_id = tracing::field::Empty,
        status = tracing::field::Empty,
        code = tracing::field::Empty,
    );
    req.extensions_mut().insert(RequestId(id.clone()));
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let route = route_label(req.path());
    let method = method_label(req.method());
    let started = std::time::Instant::now();
    let fut = srv.call(req);
    async move {
        let mut res = fut.await?;
        let status = res.status();
        tracing::Span::current().record("status", status.as_u16());
        if let Some(m) = metrics {
            m.http_requests
                .get_or_create(&HttpLabels {
                    route,
                    method,
                    status: status.as_u16(),
                })
                .inc();
            m.http_request_duration
                .get_or_create(&RouteLabels { route, method })
                .observe(started.elapsed().as_secs_f64());
        }
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), "request done");
        }
        if let Ok(v) = HeaderValue::from_str(&id) {
            res.headers_mut().insert(REQUEST_ID, v);
        }
        Ok(res)
    }
    .instrument(span)
}

fn method_label(m: &actix_web::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PATCH" => "PATCH",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        _ => "other",
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// A resource whose other methods answer 405 as a problem (without this they
/// would fall through to the application's 404).
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

/// `/api/v1/sales/{id}` and `/api/v1/sales/{id}/purchases`, matched by hand.
///
/// These are the hot routes. actix-router matches every pattern with a
/// `{segment}` by running a regex, one per candidate route; measured, that
/// was a quarter of the CPU of a sold-out storm. Under the static `/sales`
/// scope the rest of the path is split here instead.
async fn sale_routes(
    req: actix_web::HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let tail = req.match_info().unprocessed().trim_start_matches('/');
    let mut parts = tail.split('/');
    let (id, rest) = (parts.next().unwrap_or(""), (parts.next(), parts.next()));
    if id.is_empty() {
        return Err(ApiError::NotFound);
    }
    tracing::Span::current().record("sale_id", id);
    match rest {
        (None, _) if req.method() == actix_web::http::Method::GET => {
            sales::get_public(&state, id).await
        }
        (Some("events"), None) if req.method() == actix_web::http::Method::GET => {
            events::sale_events(&state, id, &req).await
        }
        (Some("purchases"), None) if req.method() == actix_web::http::Method::POST => {
            let mut payload = payload.into_inner();
            let result = match <auth::Shopper as actix_web::FromRequest>::extract(&req).await {
                Ok(shopper) => purchases::purchase(shopper, &state, id, &req, &mut payload).await,
                Err(e) => Err(e),
            };
            // A refusal before the body was read (401, 429, 404...) reads it
            // now, so that the client's connection stays open; after a full
            // read this finds the end at once.
            json::discard_body(&mut payload, state.max_body_bytes, state.body_timeout).await;
            let outcome = match &result {
                Ok(r) if r.status() == actix_web::http::StatusCode::CREATED => "created",
                Ok(_) => "replayed",
                Err(e) => e.code(),
            };
            tracing::Span::current().record("code", outcome);
            state
                .metrics
                .purchases
                .get_or_create(&crate::metrics::OutcomeLabels { outcome })
                .inc();
            result
        }
        (None, _) | (Some("purchases" | "events"), None) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    }
}

/// Every route of the server. The payment webhook exists only with the
/// webhook provider: with the simulated one nobody may call it.
pub fn routes(cfg: &mut web::ServiceConfig, webhook: bool) {
    let mut api = web::scope("/api/v1")
        .service(resource("/users").route(web::post().to(users::register)))
        .service(resource("/sessions").route(web::post().to(users::login)))
        .service(
            web::scope("/sales")
                .service(resource("").route(web::get().to(sales::list_public)))
                .service(resource("/events").route(web::get().to(events::all_sales_events)))
                .default_service(web::to(sale_routes)),
        )
        .service(resource("/orders").route(web::get().to(purchases::list_orders)))
        .service(resource("/orders/{id}").route(web::get().to(purchases::get_order)))
        .service(resource("/orders/{id}/payment").route(web::post().to(purchases::pay)))
        .service(resource("/orders/{id}/cancel").route(web::post().to(purchases::cancel)));
    if webhook {
        api = api.service(resource("/payments/webhook").route(web::post().to(payments::webhook)));
    }
    // actix tries the routes in this order, and a route with a `{segment}`
    // costs a regex run for every request that reaches it: the shopper API
    // comes first and the pages last.
    cfg.service(api)
        .service(resource("/healthz").route(web::get().to(health::healthz)))
        .service(resource("/metrics").route(web::get().to(admin::metrics)))
        .service(resource("/readyz").route(web::get().to(health::readyz)))
        .service(resource("/openapi.json").route(web::get().to(health::openapi)))
        .service(
            web::scope("/admin/v1")
                .service(
                    resource("/sales")
                        .route(web::get().to(sales::list_admin))
                        .route(web::post().to(sales::create)),
                )
                .service(
                    resource("/sales/{id}")
                        .route(web::get().to(sales::get_admin))
                        .route(web::patch().to(sales::patch)),
                )
                .service(resource("/actors").route(web::get().to(admin::actors)))
                .service(resource("/events").route(web::get().to(events::admin_events)))
                .service(resource("/events/tickets").route(web::post().to(events::ticket)))
                .service(resource("/sales/{id}/pause").route(web::post().to(sales::pause)))
                .service(resource("/sales/{id}/resume").route(web::post().to(sales::resume))),
        )
        .service(resource("/").route(web::get().to(pages::page)))
        .service(resource("/admin").route(web::get().to(pages::page)))
        .service(resource("/assets/{file}").route(web::get().to(pages::page)))
        .default_service(web::to(not_found));
}
