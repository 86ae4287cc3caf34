//! Short-lived session tokens for the HTTP pull API. An agent exchanges its
//! secret for one (`POST /v1/agent/auth`); the token lives in Redis with a
//! TTL that slides while it is used, and revoking the agent deletes it.
//!
//! Keys (under `REDIS_KEY_PREFIX`): `agent-token:<sha256 hex>` holds the
//! session as JSON; `agent-tokens:<agent id>` is the set of an agent's
//! token keys, so revocation can delete them all.

use std::time::Duration;

use bus::Bus;
use domain::{AgentId, OrgId};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{GatewayError, GatewayResult};

pub const TOKEN_PREFIX: &str = "syt";

/// What a token stands for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenSession {
    pub agent_id: AgentId,
    pub org_id: OrgId,
    pub session_id: Uuid,
}

fn token_key(bus: &Bus, token: &str) -> String {
    bus.key(&format!(
        "agent-token:{}",
        hex::encode(db::secrets::hash(token))
    ))
}

fn agent_set_key(bus: &Bus, agent: AgentId) -> String {
    bus.key(&format!("agent-tokens:{agent}"))
}

fn ttl_ms(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// Issues a token for `session`, valid for `ttl` after its last use.
pub async fn issue(bus: &Bus, session: &TokenSession, ttl: Duration) -> GatewayResult<String> {
    let token = db::secrets::generate(TOKEN_PREFIX);
    let key = token_key(bus, &token);
    let value =
        serde_json::to_string(session).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let set = agent_set_key(bus, session.agent_id);
    let mut conn = bus.connection();
    // Two steps, not one MULTI: on a Redis Cluster the two keys may live on
    // different shards. A lost SADD only weakens the best-effort revocation.
    let _: () = conn
        .set_options(
            &key,
            value,
            redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl_ms(ttl))),
        )
        .await
        .map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    let _: () = redis::pipe()
        .cmd("SADD")
        .arg(&set)
        .arg(&key)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&set)
        .arg(ttl_ms(ttl) * 4)
        .ignore()
        .query_async(&mut conn)
        .await
        .map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    Ok(token)
}

/// The session behind `token`, renewing its TTL; `None` if unknown or expired.
pub async fn resolve(bus: &Bus, token: &str, ttl: Duration) -> GatewayResult<Option<TokenSession>> {
    let key = token_key(bus, token);
    let mut conn = bus.connection();
    let value: Option<String> = redis::cmd("GETEX")
        .arg(&key)
        .arg("PX")
        .arg(ttl_ms(ttl))
        .query_async(&mut conn)
        .await
        .map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
}

/// Deletes every token of `agent` (best effort: the agent's revocation in
/// PostgreSQL is checked on each request anyway).
pub async fn revoke_all(bus: &Bus, agent: AgentId) {
    let set = agent_set_key(bus, agent);
    let mut conn = bus.connection();
    let keys: Vec<String> = conn.smembers(&set).await.unwrap_or_default();
    // One DEL per key, since on a cluster the keys span shards.
    let mut result = Ok(());
    for key in keys.iter().chain(std::iter::once(&set)) {
        result = result.and(conn.del::<_, ()>(key).await);
    }
    if let Err(error) = result {
        tracing::warn!(agent.id = %agent, error = %error, "could not delete the agent's HTTP tokens");
    }
}
