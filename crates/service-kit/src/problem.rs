//! RFC 9457 problem details (`application/problem+json`), the one error
//! body every Switchyard HTTP endpoint returns.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use serde::Serialize;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem document. `type` is a stable URI-like identifier clients can
/// match on; `title` is its short human summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Per-field validation errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<domain::validation::FieldError>,
}

impl Problem {
    /// `slug` becomes the type `https://switchyard.dev/problems/<slug>`.
    pub fn new(status: StatusCode, slug: &str, title: &str) -> Self {
        Self {
            kind: format!("https://switchyard.dev/problems/{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: None,
            instance: None,
            errors: Vec::new(),
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn errors(mut self, errors: Vec<domain::validation::FieldError>) -> Self {
        self.errors = errors;
        self
    }

    pub fn response(&self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        HttpResponse::build(status)
            .content_type(CONTENT_TYPE)
            .json(self)
    }
}
