//! The sales catalogue: public views for shoppers and the admin API.

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::json::ApiJson;
use super::AppState;
use crate::actors::registry::SaleHandle;
use crate::actors::stock::{ChangeError, ChangeSale, SaleChange, StockActor};
pub use crate::domain::sale::SaleView;
use crate::domain::sale::{PatchError, Sale, SalePatch, SaleSpec};
use crate::domain::sale_book::{BookCounters, SaleBook};

/// One sale and the server's clock, so clients can count down to the start.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SaleWithTime {
    #[serde(flatten)]
    pub sale: SaleView,
    pub server_time: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SaleList {
    pub server_time: DateTime<Utc>,
    pub sales: Vec<SaleView>,
}

/// Units of a sale by order status (sums of quantities).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct CountersView {
    pub reserved: i64,
    pub paid: i64,
    pub expired: i64,
    pub cancelled: i64,
}

impl From<BookCounters> for CountersView {
    fn from(c: BookCounters) -> Self {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        CountersView {
            reserved: i(c.reserved),
            paid: i(c.paid),
            expired: i(c.expired),
            cancelled: i(c.cancelled),
        }
    }
}

/// A sale with its order counters, for admins.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminSaleView {
    #[serde(flatten)]
    pub sale: SaleView,
    #[serde(flatten)]
    pub counters: CountersView,
    pub paused: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminSaleList {
    pub sales: Vec<AdminSaleView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSale {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub price_cents: i64,
    #[serde(default)]
    pub currency: Option<String>,
    pub stock_total: i64,
    #[serde(default)]
    pub per_user_limit: Option<i64>,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    #[serde(default)]
    pub reservation_ttl_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchSale {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    pub stock_total: Option<i64>,
    pub per_user_limit: Option<i64>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub reservation_ttl_secs: Option<i64>,
}

impl From<PatchSale> for SalePatch {
    fn from(p: PatchSale) -> Self {
        SalePatch {
            name: p.name,
            description: p.description,
            price_cents: p.price_cents,
            currency: p.currency,
            stock_total: p.stock_total,
            per_user_limit: p.per_user_limit,
            starts_at: p.starts_at,
            ends_at: p.ends_at,
            reservation_ttl_secs: p.reservation_ttl_secs,
        }
    }
}

impl From<PatchError> for ApiError {
    fn from(e: PatchError) -> Self {
        match e {
            PatchError::Invalid(v) => ApiError::Invalid(v),
            PatchError::Transition(t) => ApiError::InvalidTransition(t.to_string()),
        }
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Patch(p) => p.into(),
            ChangeError::Store(s) => s.into(),
            ChangeError::Recovering => ApiError::Unavailable {
                reason: "the sale opens once recovery has drained the order log",
                retry_after_secs: 1,
            },
        }
    }
}

/// Path ids that are not UUIDs name no sale.
pub(crate) fn sale_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::SaleNotFound)
}

fn handle(state: &AppState, id: Uuid) -> Result<Arc<SaleHandle>, ApiError> {
    state.registry.get(id).ok_or(ApiError::SaleNotFound)
}

fn public_view(h: &SaleHandle, now: DateTime<Utc>) -> SaleView {
    SaleView::new(&h.shared.sale(), i64::from(h.shared.stock_left()), now)
}

fn admin_view(h: &SaleHandle, now: DateTime<Utc>) -> AdminSaleView {
    let sale = h.shared.sale();
    AdminSaleView {
        sale: SaleView::new(&sale, i64::from(h.shared.stock_left()), now),
        counters: h.shared.counters().into(),
        paused: sale.paused,
        created_at: sale.created_at,
        updated_at: sale.updated_at,
    }
}

/// Newest start first, then by id, so lists are stable.
fn sorted_sales(state: &AppState) -> Vec<Arc<SaleHandle>> {
    let mut all = state.registry.all();
    all.sort_by_cached_key(|h| {
        let s = h.shared.sale();
        (std::cmp::Reverse(s.spec.starts_at), s.id)
    });
    all
}

async fn change(
    state: &AppState,
    raw_id: &str,
    change: SaleChange,
) -> Result<HttpResponse, ApiError> {
    let h = handle(state, sale_id(raw_id)?)?;
    let sale = state
        .running_actor(&h)
        .await?
        .send(ChangeSale(change))
        .await
        .map_err(|_| ApiError::Unavailable {
            reason: "the sale is not running",
            retry_after_secs: state.retry_after_secs,
        })??;
    tracing::info!(sale_id = %sale.id, paused = sale.paused, "sale changed");
    Ok(HttpResponse::Ok().json(admin_view(&h, Utc::now())))
}

#[utoipa::path(get, path = "/api/v1/sales", tag = "shoppers",
    responses((status = 200, body = SaleList)))]
pub async fn list_public(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let now = Utc::now();
    let sales = sorted_sales(&state)
        .iter()
        .map(|h| public_view(h, now))
        .collect();
    Ok(HttpResponse::Ok().json(SaleList {
        server_time: now,
        sales,
    }))
}

#[utoipa::path(get, path = "/api/v1/sales/{id}", tag = "shoppers",
    params(("id" = String, Path, description = "sale id")),
    responses((status = 200, body = SaleWithTime),
        (status = 404, description = "sale_not_found", body = Problem)))]
pub async fn get_public(state: &AppState, raw_id: &str) -> Result<HttpResponse, ApiError> {
    let h = handle(state, sale_id(raw_id)?)?;
    let now = Utc::now();
    Ok(HttpResponse::Ok().json(SaleWithTime {
        sale: public_view(&h, now),
        server_time: now,
    }))
}

#[utoipa::path(post, path = "/admin/v1/sales", tag = "admins", request_body = CreateSale,
    security(("admin_token" = [])),
    responses((status = 201, body = AdminSaleView),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 422, description = "invalid_input", body = Problem)))]
pub async fn create(
    _: Admin,
    state: web::Data<AppState>,
    body: ApiJson<CreateSale>,
) -> Result<HttpResponse, ApiError> {
    let b = body.0;
    let defaults = &state.sales_defaults;
    let spec = SaleSpec {
        name: b.name,
        description: b.description.unwrap_or_default(),
        price_cents: b.price_cents,
        currency: b
            .currency
            .unwrap_or_else(|| defaults.default_currency.clone()),
        stock_total: b.stock_total,
        per_user_limit: b
            .per_user_limit
            .unwrap_or(i64::from(defaults.default_per_user_limit)),
        starts_at: b.starts_at,
        ends_at: b.ends_at,
        reservation_ttl_secs: b
            .reservation_ttl_secs
            .unwrap_or(i64::from(defaults.default_reservation_ttl_secs)),
    };
    spec.validate()?;
    let now = Utc::now();
    let sale = Sale {
        id: Uuid::now_v7(),
        spec,
        paused: false,
        created_at: now,
        updated_at: now,
    };
    state.store.insert_sale(&sale).await?;
    tracing::info!(sale_id = %sale.id, name = %sale.spec.name, "sale created");
    let h = StockActor::launch(SaleBook::new(sale), &state.stock, true);
    Ok(HttpResponse::Created().json(admin_view(&h, now)))
}

#[utoipa::path(get, path = "/admin/v1/sales", tag = "admins", security(("admin_token" = [])),
    responses((status = 200, body = AdminSaleList),
        (status = 401, description = "unauthenticated", body = Problem)))]
pub async fn list_admin(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let now = Utc::now();
    let sales = sorted_sales(&state)
        .iter()
        .map(|h| admin_view(h, now))
        .collect();
    Ok(HttpResponse::Ok().json(AdminSaleList { sales }))
}

#[utoipa::path(get, path = "/admin/v1/sales/{id}", tag = "admins", security(("admin_token" = [])),
    params(("id" = String, Path, description = "sale id")),
    responses((status = 200, body = AdminSaleView),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 404, description = "sale_not_found", body = Problem)))]
pub async fn get_admin(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let h = handle(&state, sale_id(&path)?)?;
    Ok(HttpResponse::Ok().json(admin_view(&h, Utc::now())))
}

#[utoipa::path(patch, path = "/admin/v1/sales/{id}", tag = "admins", request_body = PatchSale,
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "sale id")),
    responses((status = 200, body = AdminSaleView),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 404, description = "sale_not_found", body = Problem),
        (status = 409, description = "invalid_transition", body = Problem),
        (status = 422, description = "invalid_input", body = Problem)))]
pub async fn patch(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: ApiJson<PatchSale>,
) -> Result<HttpResponse, ApiError> {
    change(&state, &path, SaleChange::Patch(body.0.into())).await
}

#[utoipa::path(post, path = "/admin/v1/sales/{id}/pause", tag = "admins",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "sale id")),
    responses((status = 200, body = AdminSaleView),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 404, description = "sale_not_found", body = Problem),
        (status = 409, description = "invalid_transition", body = Problem)))]
pub async fn pause(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change(&state, &path, SaleChange::Pause(true)).await
}

#[utoipa::path(post, path = "/admin/v1/sales/{id}/resume", tag = "admins",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "sale id")),
    responses((status = 200, body = AdminSaleView),
        (status = 401, description = "unauthenticated", body = Problem),
        (status = 404, description = "sale_not_found", body = Problem),
        (status = 409, description = "invalid_transition", body = Problem)))]
pub async fn resume(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change(&state, &path, SaleChange::Pause(false)).await
}
