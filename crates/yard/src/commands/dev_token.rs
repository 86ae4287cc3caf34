//! `yard dev-token`: a PropelAuth-shaped HS256 token for local use, signed
//! with `AUTH_HS256_SECRET` (the development secret the services accept
//! when it is set) and carrying `AUTH_ISSUER` as `iss` when that is set.
//! Prints only the token, so `TOKEN=$(yard dev-token --org acme)` works.

use std::io::Write;
use std::time::Duration;

use auth::Role;
use domain::OrgId;

use super::{Failure, print_line};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Org the token grants membership in (repeat for several).
    #[arg(long = "org", value_name = "ORG_ID", required = true, value_parser = parse_org)]
    pub orgs: Vec<OrgId>,
    /// Role in each org.
    #[arg(long, value_enum, ignore_case = true, default_value_t = RoleArg::Owner)]
    pub role: RoleArg,
    /// The token's user_id.
    #[arg(long, value_name = "ID", default_value = "dev-user", value_parser = parse_user)]
    pub user: String,
    /// Lifetime in hours.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 720,
        value_parser = clap::value_parser!(u64).range(1..=24 * 366)
    )]
    pub ttl_hours: u64,
}

/// `auth::Role` as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    #[value(name = "Owner")]
    Owner,
    #[value(name = "Admin")]
    Admin,
    #[value(name = "Member")]
    Member,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Owner => Role::Owner,
            RoleArg::Admin => Role::Admin,
            RoleArg::Member => Role::Member,
        }
    }
}

fn parse_org(raw: &str) -> Result<OrgId, String> {
    OrgId::parse(raw).map_err(|e| e.to_string())
}

fn parse_user(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.contains(char::is_whitespace) {
        return Err("must be non-empty, without spaces".into());
    }
    Ok(raw.to_owned())
}

pub fn run(
    args: &Args,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let present = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let secret = present("AUTH_HS256_SECRET").ok_or_else(|| {
        Failure::usage(
            "AUTH_HS256_SECRET is not set: dev tokens are signed with the development HS256 \
             secret the services are started with (see .env.example)",
        )
    })?;
    let issuer = present("AUTH_ISSUER");
    let role = Role::from(args.role);
    let orgs: Vec<(OrgId, Role)> = args.orgs.iter().map(|org| (org.clone(), role)).collect();
    let token = auth::dev::mint_hs256(
        &secret,
        issuer.as_deref(),
        &args.user,
        &orgs,
        Duration::from_secs(args.ttl_hours * 3600),
    );
    print_line(out, &token)
}
