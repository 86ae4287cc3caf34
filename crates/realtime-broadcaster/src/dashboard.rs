//! The web dashboard: one page, its script and stylesheet, embedded in the
//! binary (no CDN, no build step). The page calls job-api's REST API from
//! the browser (`DASHBOARD_API_URL`) and this service's WebSocket.

use actix_web::{HttpResponse, http::header, web};

const INDEX: &str = include_str!("../assets/index.html");
const APP: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");

/// The dashboard's settings, rendered into the page.
pub struct Dashboard {
    index: String,
}

impl Dashboard {
    pub fn new(api_url: &str) -> Self {
        let api = serde_json::to_string(api_url.trim_end_matches('/'))
            .unwrap_or_else(|_| "\"\"".to_owned());
        Self {
            index: INDEX.replace("\"__API_URL__\"", &api),
        }
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/app.js", web::get().to(app))
        .route("/style.css", web::get().to(style));
}

async fn index(dashboard: web::Data<Dashboard>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(dashboard.index.clone())
}

async fn app() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/javascript; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(APP)
}

async fn style() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/css; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(STYLE)
}
