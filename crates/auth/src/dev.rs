//! Tokens for local development and tests, signed with the HS256 secret
//! that a development verifier accepts. Never use in production paths.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use domain::OrgId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

use crate::Role;

/// Mints an HS256 token in PropelAuth's shape (`user_id`, `iat`, `exp`,
/// `iss` when given, `org_id_to_org_member_info` with one entry per org,
/// its role and the roles it inherits, no permissions), valid for `ttl`.
pub fn mint_hs256(
    secret: &str,
    issuer: Option<&str>,
    user_id: &str,
    orgs: &[(OrgId, Role)],
    ttl: Duration,
) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let members: Map<String, Value> = orgs
        .iter()
        .map(|(org, role)| {
            let inherited: Vec<&str> = role
                .with_inherited()
                .into_iter()
                .map(Role::as_str)
                .collect();
            let info = json!({
                "org_id": org.as_str(),
                "org_name": org.as_str(),
                "url_safe_org_name": org.as_str(),
                "org_metadata": {},
                "org_role_structure": "single_role_in_hierarchy",
                "user_role": role.as_str(),
                "inherited_user_roles_plus_current_role": inherited,
                "user_permissions": [],
                "additional_roles": [],
            });
            (org.as_str().to_owned(), info)
        })
        .collect();
    let mut claims = json!({
        "user_id": user_id,
        "iat": now,
        "exp": now.saturating_add(ttl.as_secs()),
        "org_id_to_org_member_info": members,
        "login_method": { "login_method": "generated_from_backend_api" },
    });
    if let (Some(issuer), Some(object)) = (issuer, claims.as_object_mut()) {
        object.insert("iss".into(), Value::from(issuer));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of in-memory JSON claims cannot fail")
}
