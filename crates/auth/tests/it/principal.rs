//! What a verified token grants: roles (Owner ⊇ Admin ⊇ Member),
//! permissions, and which org entries count.

use auth::{Principal, Role};
use domain::OrgId;
use serde_json::{Value, json};

use crate::{SECRET, claims_with, hs_verifier, hs256};

fn org(id: &str) -> OrgId {
    OrgId::parse(id).expect("org id")
}

async fn principal_with(extra: Value) -> Principal {
    let token = hs256(SECRET, &claims_with(600, extra));
    hs_verifier().verify(&token).await.expect("valid")
}

fn member_info(org_id: &str, user_role: &str, inherited: &[&str], permissions: &[&str]) -> Value {
    json!({
        "org_id": org_id,
        "org_name": format!("{org_id} Inc"),
        "user_role": user_role,
        "inherited_user_roles_plus_current_role": inherited,
        "user_permissions": permissions,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn owner_includes_admin_includes_member() {
    let principal = principal_with(json!({ "org_id_to_org_member_info": {
        "o": member_info("o", "Owner", &["Owner", "Admin", "Member"], &[]),
        "a": member_info("a", "Admin", &["Admin", "Member"], &[]),
        "m": member_info("m", "Member", &["Member"], &[]),
    }}))
    .await;
    let grants = |id: &str| {
        let membership = principal.membership(&org(id)).expect("member");
        Role::ALL.map(|role| membership.is_at_least(role))
    };
    // [Member, Admin, Owner]
    assert_eq!(grants("o"), [true, true, true]);
    assert_eq!(grants("a"), [true, true, false]);
    assert_eq!(grants("m"), [true, false, false]);
    assert!(Role::Owner > Role::Admin && Role::Admin > Role::Member);
}

#[tokio::test(flavor = "multi_thread")]
async fn permissions_grant_what_the_role_does_not() {
    let principal = principal_with(json!({ "org_id_to_org_member_info": {
        "acme": member_info("acme", "Member", &["Member"], &["jobs:approve"]),
    }}))
    .await;
    let acme = principal.membership(&org("acme")).expect("member");
    assert!(acme.has_permission("jobs:approve"));
    assert!(!acme.has_permission("agents:manage"));
    assert!(acme.may(Role::Admin, "jobs:approve"));
    assert!(!acme.may(Role::Admin, "agents:manage"));
    assert!(acme.may(Role::Member, "agents:manage"));
    assert_eq!(acme.permissions, ["jobs:approve"]);
    assert_eq!(acme.org_name.as_deref(), Some("acme Inc"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_role_is_the_highest_known_one_listed() {
    let principal = principal_with(json!({ "org_id_to_org_member_info": {
        // A custom role placed above Admin in the hierarchy.
        "custom-above": member_info("custom-above", "Billing", &["Billing", "Admin", "Member"], &[]),
        // A custom role alone counts as Member.
        "custom-alone": member_info("custom-alone", "Billing", &["Billing"], &[]),
        // No inherited list: user_role decides.
        "bare": { "org_id": "bare", "user_role": "Admin" },
        // Nothing at all: Member.
        "nothing": { "org_id": "nothing" },
    }}))
    .await;
    let role = |id: &str| principal.membership(&org(id)).expect("member").role;
    assert_eq!(role("custom-above"), Role::Admin);
    assert_eq!(role("custom-alone"), Role::Member);
    assert_eq!(role("bare"), Role::Admin);
    assert_eq!(role("nothing"), Role::Member);
    assert_eq!(
        principal.membership(&org("custom-above")).expect("m").roles,
        ["Billing", "Admin", "Member"]
    );
    assert_eq!(
        principal.membership(&org("bare")).expect("m").roles,
        ["Admin"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_active_org_token_is_understood() {
    let principal = principal_with(json!({
        "org_id_to_org_member_info": null,
        "org_member_info": member_info("acme", "Owner", &["Owner", "Admin", "Member"], &[]),
    }))
    .await;
    assert_eq!(principal.orgs.len(), 1);
    assert_eq!(
        principal.membership(&org("acme")).expect("member").role,
        Role::Owner
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_org_entries_are_skipped() {
    let principal = principal_with(json!({ "org_id_to_org_member_info": {
        "has space": member_info("has space", "Owner", &["Owner"], &[]),
        "mismatch": member_info("other", "Owner", &["Owner"], &[]),
        "broken": { "org_id": "broken", "user_permissions": "not a list" },
        "good": member_info("good", "Member", &["Member"], &[]),
    }}))
    .await;
    assert_eq!(principal.orgs.keys().collect::<Vec<_>>(), [&org("good")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_in_no_org_is_still_a_principal() {
    let principal = principal_with(json!({ "org_id_to_org_member_info": {} })).await;
    assert_eq!(principal.user_id, "u-1");
    assert!(principal.orgs.is_empty());
    assert_eq!(principal.actor(), "user:u-1");
}
