//! The OpenAPI document, generated from the handlers' annotations so that it
//! cannot drift from the code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, error, events, health, payments, purchases, sales, users};

#[derive(OpenApi)]
#[openapi(
    info(title = "flashsale", description = "A flash-sale server. Errors are application/problem+json with a stable `code`."),
    paths(
        users::register, users::login,
        sales::list_public, sales::get_public,
        purchases::purchase, purchases::list_orders, purchases::get_order,
        purchases::pay, purchases::cancel, payments::webhook,
        sales::create, sales::list_admin, sales::get_admin, sales::patch, sales::pause, sales::resume,
        admin::actors, admin::metrics,
        events::sale_events, events::all_sales_events, events::ticket, events::admin_events,
        health::healthz, health::readyz, health::openapi,
    ),
    components(schemas(error::Problem)),
    modifiers(&BearerSchemes),
    tags((name = "shoppers"), (name = "admins"), (name = "operations")),
)]
pub struct ApiDoc;

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |desc: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(desc))
                    .build(),
            )
        };
        components.add_security_scheme("shopper_token", bearer("JWT from POST /api/v1/sessions"));
        components.add_security_scheme("admin_token", bearer("the configured admin token"));
    }
}
