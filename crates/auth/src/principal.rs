//! Who a verified token speaks for, and what they may do in each org.
//!
//! Claims follow PropelAuth's access token: `user_id`, `email` and
//! `org_id_to_org_member_info` (or `org_member_info` for a token minted for
//! one active org). See `shared/reference/protocol.md` §6.1.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use domain::OrgId;
use serde::Deserialize;
use serde_json::Value;

use crate::AuthError;

/// An org role in PropelAuth's default hierarchy: Owner ⊇ Admin ⊇ Member.
/// Custom roles outside the hierarchy count as `Member`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Member, Role::Admin, Role::Owner];

    /// The name PropelAuth uses (`"Owner"`, `"Admin"`, `"Member"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "Member",
            Role::Admin => "Admin",
            Role::Owner => "Owner",
        }
    }

    /// One of the three hierarchy names, case-insensitively.
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(name.trim()))
    }

    /// This role and every role it includes, highest first, as PropelAuth
    /// lists them in `inherited_user_roles_plus_current_role`.
    pub fn with_inherited(self) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .rev()
            .filter(|role| *role <= self)
            .collect()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `Owner`, `Admin` or `Member` (any case); custom roles are an
/// error here, unlike in tokens.
impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::from_name(s).ok_or_else(|| format!("unknown role {s:?}: use Owner, Admin or Member"))
    }
}

/// The user's standing in one org.
#[derive(Clone, Debug, PartialEq)]
pub struct OrgMembership {
    pub org_id: OrgId,
    pub org_name: Option<String>,
    /// The highest hierarchy role the token grants in this org.
    pub role: Role,
    /// Every role name the token lists, custom ones included.
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
}

impl OrgMembership {
    pub fn is_at_least(&self, role: Role) -> bool {
        self.role >= role
    }

    pub fn has_permission(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }

    /// Allowed by role (at least `role`) or by an explicit permission grant.
    pub fn may(&self, role: Role, permission: &str) -> bool {
        self.is_at_least(role) || self.has_permission(permission)
    }
}

/// A verified user.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub user_id: String,
    pub email: Option<String>,
    pub orgs: BTreeMap<OrgId, OrgMembership>,
}

impl Principal {
    /// The membership in `org`, or `None` when the token grants none (403).
    pub fn membership(&self, org: &OrgId) -> Option<&OrgMembership> {
        self.orgs.get(org)
    }

    /// How audit records name this principal: `user:<id>`.
    pub fn actor(&self) -> String {
        format!("user:{}", self.user_id)
    }

    /// Builds the principal from verified claims.
    pub(crate) fn from_claims(claims: Value) -> Result<Self, AuthError> {
        let claims: Claims = serde_json::from_value(claims)
            .map_err(|e| AuthError::Malformed(format!("claims: {e}")))?;
        let user_id = claims
            .user_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| AuthError::Malformed("missing claim user_id".into()))?;
        let mut orgs = BTreeMap::new();
        let entries = claims
            .org_id_to_org_member_info
            .into_iter()
            .flatten()
            .map(|(key, info)| (Some(key), info))
            .chain(claims.org_member_info.map(|info| (None, info)));
        for (key, info) in entries {
            if let Some(membership) = membership(key.as_deref(), info) {
                orgs.insert(membership.org_id.clone(), membership);
            }
        }
        Ok(Self {
            user_id,
            email: claims.email,
            orgs,
        })
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    org_id_to_org_member_info: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    org_member_info: Option<Value>,
}

#[derive(Deserialize)]
struct OrgMemberInfo {
    #[serde(default)]
    org_id: Option<String>,
    #[serde(default)]
    org_name: Option<String>,
    #[serde(default)]
    user_role: Option<String>,
    #[serde(default)]
    inherited_user_roles_plus_current_role: Option<Vec<String>>,
    #[serde(default)]
    user_permissions: Option<Vec<String>>,
}

/// One org entry, or `None` (skipped, logged at debug) when it is not
/// usable: bad shape, an id `OrgId` rejects, or a map key that disagrees
/// with the entry's own `org_id`.
fn membership(key: Option<&str>, info: Value) -> Option<OrgMembership> {
    let info: OrgMemberInfo = match serde_json::from_value(info) {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(org.key = key, %error, "skipping malformed org entry in token");
            return None;
        }
    };
    let raw_id = match (key, info.org_id.as_deref()) {
        (Some(key), Some(id)) if key != id => {
            tracing::debug!(
                org.key = key,
                org.id = id,
                "skipping org entry whose key and org_id differ"
            );
            return None;
        }
        (Some(key), _) => key,
        (None, Some(id)) => id,
        (None, None) => {
            tracing::debug!("skipping org_member_info without org_id");
            return None;
        }
    };
    let org_id = match OrgId::parse(raw_id) {
        Ok(id) => id,
        Err(_) => {
            tracing::debug!(org.id = raw_id, "skipping org entry with an invalid org id");
            return None;
        }
    };
    let mut roles = info
        .inherited_user_roles_plus_current_role
        .unwrap_or_default();
    if roles.is_empty()
        && let Some(user_role) = &info.user_role
    {
        roles.push(user_role.clone());
    }
    let role = roles
        .iter()
        .filter_map(|name| Role::from_name(name))
        .max()
        .or_else(|| info.user_role.as_deref().and_then(Role::from_name))
        .unwrap_or(Role::Member);
    Some(OrgMembership {
        org_id,
        org_name: info.org_name,
        role,
        roles,
        permissions: info.user_permissions.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_ones_below() {
        assert_eq!(
            Role::Owner.with_inherited(),
            vec![Role::Owner, Role::Admin, Role::Member]
        );
        assert_eq!(Role::Member.with_inherited(), vec![Role::Member]);
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert!("Billing".parse::<Role>().is_err());
    }
}
