//! The REST client the job commands share: where job-api is, which token
//! and org to use, `--json` output, and exit codes scripts can rely on.
//!
//! Exit codes: 0 success; 1 the server or network failed; 2 usage or
//! configuration error; 3 not found; 4 not authenticated or not allowed;
//! 5 refused by the job's state or by validation (409, 422).

use serde_json::Value;

use super::Failure;

/// Options every API command takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ApiOptions {
    /// job-api base URL.
    #[arg(
        long,
        env = "SWITCHYARD_API_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api: String,
    /// Access token (JWT).
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Organization id.
    #[arg(long, env = "SWITCHYARD_ORG", global = true)]
    pub org: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    org: Option<String>,
    pub json: bool,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(options: &ApiOptions) -> Result<Self, Failure> {
        let token = options
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Failure::usage("no token: pass --token or set SWITCHYARD_TOKEN"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::runtime(format!("starting the runtime: {e}")))?;
        Ok(Self {
            http: reqwest::Client::new(),
            base: options.api.trim_end_matches('/').to_owned(),
            token,
            org: options.org.clone(),
            json: options.json,
            runtime,
        })
    }

    /// `/v1/orgs/<org>` + `path`.
    pub fn org_path(&self, path: &str) -> Result<String, Failure> {
        let org = self
            .org
            .as_deref()
            .ok_or_else(|| Failure::usage("no organization: pass --org or set SWITCHYARD_ORG"))?;
        Ok(format!("/v1/orgs/{org}{path}"))
    }

    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(reqwest::Method::GET, path, None, &[])
    }

    pub fn post(
        &self,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Result<Value, Failure> {
        self.send(reqwest::Method::POST, path, body, headers)
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.runtime.block_on(async move {
            let response = request
                .send()
                .await
                .map_err(|e| Failure::runtime(format!("cannot reach {url}: {e}")))?;
            let status = response.status();
            let text = response
                .text()
                .await
                .map_err(|e| Failure::runtime(format!("reading the response: {e}")))?;
            let value: Value = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            if status.is_success() {
                return Ok(value);
            }
            let code = match status.as_u16() {
                401 | 403 => 4,
                404 => 3,
                409 | 422 => 5,
                400..=499 => 2,
                _ => 1,
            };
            Err(Failure {
                code,
                message: describe_problem(status.as_u16(), &value),
            })
        })
    }
}

/// One readable line from a problem+json body, with field errors.
fn describe_problem(status: u16, body: &Value) -> String {
    let title = body["title"].as_str().unwrap_or("request failed");
    let mut message = match body["detail"].as_str() {
        Some(detail) => format!("{status} {title}: {detail}"),
        None => format!("{status} {title}"),
    };
    if let Some(errors) = body["errors"].as_array() {
        for error in errors {
            message.push_str(&format!(
                "\n  {}: {}",
                error["field"].as_str().unwrap_or("?"),
                error["message"].as_str().unwrap_or("?")
            ));
        }
    }
    message
}

/// Renders rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| (*h).to_owned()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

/// A JSON field as text for a table cell.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_read_as_one_line_plus_fields() {
        let body = serde_json::json!({"title": "Invalid request", "detail": "bad", "errors": [{"field": "priority", "message": "too big"}]});
        assert_eq!(
            describe_problem(422, &body),
            "422 Invalid request: bad\n  priority: too big"
        );
    }

    #[test]
    fn tables_align() {
        let out = table(
            &["ID", "STATUS"],
            &[
                vec!["a".into(), "queued".into()],
                vec!["long-id".into(), "ok".into()],
            ],
        );
        assert_eq!(out, "ID       STATUS\na        queued\nlong-id  ok");
    }
}
