//! Keys from a JWKS endpoint, cached by `kid`.
//!
//! The set is fetched on first use. A `kid` that is not in the cache
//! triggers a refetch (so a rotated-in key works at once), but at most one
//! such refetch per [`MIN_REFETCH_INTERVAL`]: a flood of tokens with bogus
//! kids costs the IdP one request per window, not one per token. Keys older
//! than [`MAX_KEY_AGE`] are refreshed by the next request that needs one
//! (concurrent requests keep using the old keys meanwhile), so a key the
//! IdP withdraws stops being trusted. A failed fetch is retried no sooner than
//! [`FAILED_FETCH_BACKOFF`]; until then the previous keys stay in use.
//!
//! Only signing keys the verifier accepts are kept: RSA (`n`, `e`) for
//! RS256 and EC P-256 (`x`, `y`) for ES256, each with a `kid`. `oct`
//! (shared-secret) keys are ignored, so a JWKS can never enable HS256.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use crate::AuthError;

/// Least time between two refetches caused by unknown kids.
pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Age after which cached keys are refreshed.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(15 * 60);
/// Least time between a failed fetch and the next attempt.
pub const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(5);
/// Whole-request timeout of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Whether `url` can be used as a JWKS URL in this build; the error text
/// completes "AUTH_JWKS_URL …".
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL ({e}): {url:?}"))?;
    match parsed.scheme() {
        "http" => Ok(()),
        "https" if cfg!(feature = "https") => Ok(()),
        "https" => Err(format!(
            "is https, but this build has no TLS support (auth's \"https\" feature): {url:?}"
        )),
        other => Err(format!("must be http:// or https://, not {other}://")),
    }
}

/// One usable key from the set.
pub(crate) struct JwksKey {
    pub key: DecodingKey,
    pub alg: Algorithm,
}

struct Snapshot {
    keys: HashMap<String, Arc<JwksKey>>,
    fetched_at: Instant,
}

impl Snapshot {
    fn is_stale(&self) -> bool {
        self.fetched_at.elapsed() >= MAX_KEY_AGE
    }
}

#[derive(Default)]
struct FetchState {
    last_unknown_kid_refetch: Option<Instant>,
    last_failure: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reason {
    Initial,
    Stale,
    UnknownKid,
}

pub(crate) struct Jwks {
    url: String,
    client: reqwest::Client,
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// Held while deciding on and performing a fetch: one fetch at a time.
    fetch: tokio::sync::Mutex<FetchState>,
}

impl Jwks {
    pub(crate) fn new(url: &str) -> Result<Self, AuthError> {
        check_url(url)
            .map_err(|problem| AuthError::KeySource(format!("AUTH_JWKS_URL {problem}")))?;
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| AuthError::KeySource(format!("HTTP client for JWKS: {e}")))?;
        Ok(Self {
            url: url.to_owned(),
            client,
            snapshot: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
        })
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        match self.snapshot.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn store(&self, snapshot: Snapshot) {
        let snapshot = Some(Arc::new(snapshot));
        match self.snapshot.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }

    /// The key named `kid`, fetching the set when needed (see the module
    /// doc for when that happens).
    pub(crate) async fn key(&self, kid: &str) -> Result<Arc<JwksKey>, AuthError> {
        let state = match self.current() {
            Some(snapshot) => match snapshot.keys.get(kid) {
                Some(key) if !snapshot.is_stale() => return Ok(key.clone()),
                // Stale: one request refreshes, the others keep going.
                Some(key) => match self.fetch.try_lock() {
                    Ok(state) => state,
                    Err(_) => return Ok(key.clone()),
                },
                None => self.fetch.lock().await,
            },
            None => self.fetch.lock().await,
        };
        self.key_slow(kid, state).await
    }

    async fn key_slow(
        &self,
        kid: &str,
        mut state: tokio::sync::MutexGuard<'_, FetchState>,
    ) -> Result<Arc<JwksKey>, AuthError> {
        // Another request may have fetched while this one waited.
        let snapshot = self.current();
        let reason = match &snapshot {
            None => Reason::Initial,
            Some(s) if s.is_stale() => Reason::Stale,
            Some(s) => match s.keys.get(kid) {
                Some(key) => return Ok(key.clone()),
                None => Reason::UnknownKid,
            },
        };
        let now = Instant::now();
        let backing_off = state
            .last_failure
            .is_some_and(|at| now.duration_since(at) < FAILED_FETCH_BACKOFF);
        let may_fetch = !backing_off
            && match reason {
                Reason::Initial | Reason::Stale => true,
                Reason::UnknownKid => state
                    .last_unknown_kid_refetch
                    .is_none_or(|at| now.duration_since(at) >= MIN_REFETCH_INTERVAL),
            };
        if may_fetch {
            if reason == Reason::UnknownKid {
                state.last_unknown_kid_refetch = Some(now);
            }
            match self.fetch_keys().await {
                Ok(keys) => {
                    tracing::info!(jwks.url = %self.url, jwks.keys = keys.len(), "fetched JWKS");
                    state.last_failure = None;
                    self.store(Snapshot {
                        keys,
                        fetched_at: Instant::now(),
                    });
                }
                Err(error) => {
                    state.last_failure = Some(Instant::now());
                    if snapshot.is_none() {
                        tracing::warn!(jwks.url = %self.url, %error, "JWKS fetch failed");
                        return Err(error);
                    }
                    tracing::warn!(jwks.url = %self.url, %error, "JWKS refresh failed; keeping the cached keys");
                }
            }
        } else if snapshot.is_none() {
            return Err(AuthError::KeySource(
                "JWKS could not be fetched recently; retrying shortly".into(),
            ));
        }
        drop(state);
        self.current()
            .and_then(|s| s.keys.get(kid).cloned())
            .ok_or_else(|| AuthError::UnknownKey(kid.to_owned()))
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, Arc<JwksKey>>, AuthError> {
        let fail = |what: String| AuthError::KeySource(format!("JWKS {}: {what}", self.url));
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(format!("request failed: {e}")))?;
        if !response.status().is_success() {
            return Err(fail(format!("answered {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| fail(format!("reading the body: {e}")))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(fail(format!(
                    "document larger than {MAX_DOCUMENT_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let document: Value =
            serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))?;
        let keys = parse_key_set(&document).map_err(fail)?;
        if keys.is_empty() {
            return Err(fail(
                "no usable keys (RSA or EC P-256 signing keys with a kid)".into(),
            ));
        }
        Ok(keys)
    }
}

/// The usable keys of a JWKS document; unusable ones are skipped.
fn parse_key_set(document: &Value) -> Result<HashMap<String, Arc<JwksKey>>, String> {
    let keys = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("has no \"keys\" array")?;
    let mut usable = HashMap::new();
    for jwk in keys {
        match parse_key(jwk) {
            Ok((kid, key)) => {
                usable.insert(kid, Arc::new(key));
            }
            Err(reason) => tracing::debug!(jwk.kid = ?jwk.get("kid"), reason, "skipping JWK"),
        }
    }
    Ok(usable)
}

fn parse_key(jwk: &Value) -> Result<(String, JwksKey), &'static str> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kid = field("kid").ok_or("no kid")?;
    if field("use").is_some_and(|u| u != "sig") {
        return Err("not a signing key");
    }
    let (key, alg) = match field("kty") {
        Some("RSA") => {
            let (n, e) = field("n").zip(field("e")).ok_or("RSA key without n or e")?;
            let key = DecodingKey::from_rsa_components(n, e).map_err(|_| "bad RSA components")?;
            (key, Algorithm::RS256)
        }
        Some("EC") => {
            if field("crv") != Some("P-256") {
                return Err("EC key on a curve other than P-256");
            }
            let (x, y) = field("x").zip(field("y")).ok_or("EC key without x or y")?;
            let key = DecodingKey::from_ec_components(x, y).map_err(|_| "bad EC components")?;
            (key, Algorithm::ES256)
        }
        _ => return Err("key type is not RSA or EC"),
    };
    // A JWK that names its algorithm must name the one we would use.
    if let Some(declared) = field("alg")
        && declared != algorithm_name(alg)
    {
        return Err("declared alg is not RS256 or ES256");
    }
    Ok((kid.to_owned(), JwksKey { key, alg }))
}

pub(crate) fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::HS256 => "HS256",
        _ => "other",
    }
}
