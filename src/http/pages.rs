//! The shop page (`/`) and the admin dashboard (`/admin`): plain HTML, CSS
//! and JavaScript modules from `web/`, embedded in the binary at build time
//! (no front-end build step, no CDN, no request to another host).
//!
//! Every answer carries a Content-Security-Policy that allows only this
//! server, and an ETag: browsers revalidate (`no-cache`) and get 304 while
//! the binary is the same.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// Scripts, styles, images and connections from this server only; no
/// inline script or style, no framing, no foreign form target.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
    etag: String,
}

/// Every page and asset, with its ETag.
pub struct Pages {
    assets: Vec<Asset>,
}

const FILES: [(&str, &str, &str); 7] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../web/shop.html"),
    ),
    (
        "/admin",
        "text/html; charset=utf-8",
        include_str!("../../web/admin.html"),
    ),
    (
        "/assets/app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/app.css"),
    ),
    (
        "/assets/api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/api.js"),
    ),
    (
        "/assets/shop.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/shop.js"),
    ),
    (
        "/assets/admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/admin.js"),
    ),
    (
        "/assets/icon.svg",
        "image/svg+xml",
        include_str!("../../web/icon.svg"),
    ),
];

impl Default for Pages {
    fn default() -> Self {
        let assets = FILES
            .iter()
            .map(|&(path, content_type, body)| Asset {
                path,
                content_type,
                body,
                etag: format!(
                    "\"{}\"",
                    &hex::encode(Sha256::digest(body.as_bytes()))[..20]
                ),
            })
            .collect();
        Pages { assets }
    }
}

impl Pages {
    fn answer(&self, path: &str, req: &HttpRequest) -> Result<HttpResponse, ApiError> {
        let asset = self
            .assets
            .iter()
            .find(|a| a.path == path)
            .ok_or(ApiError::NotFound)?;
        let fresh = req
            .headers()
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag));
        let mut res = if fresh {
            HttpResponse::NotModified()
        } else {
            HttpResponse::Ok()
        };
        res.insert_header((header::ETAG, asset.etag.as_str()))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .insert_header((
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ))
            .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
            .insert_header((header::REFERRER_POLICY, "no-referrer"));
        Ok(if fresh {
            res.finish()
        } else {
            res.content_type(asset.content_type).body(asset.body)
        })
    }
}

/// `GET /`, `GET /admin` and `GET /assets/{file}`.
pub async fn page(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let path = req.path();
    let path = if path == "/admin/" { "/admin" } else { path };
    state.pages.answer(path, &req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_names_only_assets_that_exist() {
        let pages = Pages::default();
        for asset in pages
            .assets
            .iter()
            .filter(|a| a.content_type.starts_with("text/html"))
        {
            for part in asset.body.split("/assets/").skip(1) {
                let name = part.split('"').next().unwrap_or_default();
                let path = format!("/assets/{name}");
                assert!(
                    pages.assets.iter().any(|a| a.path == path),
                    "{} links {path}, which is not embedded",
                    asset.path
                );
            }
        }
    }

    #[test]
    fn scripts_import_only_embedded_modules_and_no_other_host() {
        let pages = Pages::default();
        // (An SVG names its XML namespace by URL; that is no request.)
        for asset in pages
            .assets
            .iter()
            .filter(|a| a.content_type != "image/svg+xml")
        {
            assert!(
                !asset.body.contains("http://") && !asset.body.contains("https://"),
                "{} names another host",
                asset.path
            );
            for line in asset.body.lines().filter(|l| l.starts_with("import ")) {
                let module = line.rsplit("from './").next().unwrap_or_default();
                let name = module.trim_end_matches("';");
                let path = format!("/assets/{name}");
                assert!(pages.assets.iter().any(|a| a.path == path), "{line}");
            }
        }
    }
}
