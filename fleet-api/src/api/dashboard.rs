//! The dashboard: static files (`fleet-api/dashboard/`) compiled into the binary, served
//! under `/dashboard/`. No build step, no CDN: plain HTML, CSS and JavaScript that read the
//! REST API and `/api/v1/events` with the read token the operator enters.
//!
//! **API boundary:** these routes carry no data and need no token; every request the page makes
//! for data goes through the API's bearer-token check. The page keeps the token in the tab's
//! `sessionStorage` (never in a URL it requests, never in a cookie), and the strict
//! Content-Security-Policy below allows only this origin.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::AppState;

const INDEX: &str = include_str!("../../dashboard/index.html");
const APP_JS: &str = include_str!("../../dashboard/app.js");
const ROLLOUTS_JS: &str = include_str!("../../dashboard/rollouts.js");
const MODELS_JS: &str = include_str!("../../dashboard/models.js");
const MONITORING_JS: &str = include_str!("../../dashboard/monitoring.js");
const CAPTURES_JS: &str = include_str!("../../dashboard/captures.js");
const APP_CSS: &str = include_str!("../../dashboard/app.css");

/// Same-origin only; no inline script; styles only from the stylesheet (plus `style`
/// attributes the script sets for chart sizes).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/") }))
        .route(
            "/dashboard/",
            get(|| async { file(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { file(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/rollouts.js",
            get(|| async { file(ROLLOUTS_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/models.js",
            get(|| async { file(MODELS_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/monitoring.js",
            get(|| async { file(MONITORING_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/captures.js",
            get(|| async { file(CAPTURES_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { file(APP_CSS, "text/css; charset=utf-8") }),
        )
}

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}
