//! Who is calling: the verified token ([`Caller`]) and, for routes under
//! `/v1/orgs/{org_id}/`, the caller's membership of that org ([`OrgCaller`]).
//! Not a member: 404, so other orgs' existence never leaks. A member without
//! the role or permission: 403.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use auth::{OrgMembership, Principal, Role};
use domain::OrgId;
use service_kit::http::RequestId;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub struct Caller {
    pub principal: Principal,
    pub request_id: Option<String>,
}

impl Caller {
    pub fn actor(&self) -> String {
        self.principal.actor()
    }
}

fn request_id(req: &HttpRequest) -> Option<String> {
    req.extensions().get::<RequestId>().map(|id| id.0.clone())
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let request_id = request_id(req);
        Box::pin(async move {
            let state =
                state.ok_or_else(|| ApiError::Internal("application state missing".into()))?;
            let header = header.ok_or_else(|| {
                ApiError::Unauthenticated("missing Authorization: Bearer token".into())
            })?;
            let token = auth::bearer(&header).ok_or_else(|| {
                ApiError::Unauthenticated("Authorization must be 'Bearer <token>'".into())
            })?;
            let principal = state.verifier.verify(token).await?;
            Ok(Caller {
                principal,
                request_id,
            })
        })
    }
}

pub struct OrgCaller {
    pub caller: Caller,
    pub org: OrgId,
    pub membership: OrgMembership,
}

impl OrgCaller {
    /// Allows the action to members of at least `role`, or holders of `permission`.
    pub fn require(&self, role: Role, permission: &str) -> ApiResult<()> {
        if self.membership.may(role, permission) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this action needs the {} role or the '{permission}' permission",
                role.as_str()
            )))
        }
    }

    pub fn actor(&self) -> String {
        self.caller.actor()
    }

    pub fn request_id(&self) -> Option<&str> {
        self.caller.request_id.as_deref()
    }
}

impl FromRequest for OrgCaller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let caller = Caller::from_request(req, payload);
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let org = req.match_info().get("org_id").map(str::to_owned);
        Box::pin(async move {
            let caller = caller.await?;
            let org = org
                .and_then(|raw| OrgId::parse(raw).ok())
                .ok_or(ApiError::NotFound("organization"))?;
            let membership = caller
                .principal
                .membership(&org)
                .cloned()
                .ok_or(ApiError::NotFound("organization"))?;
            if let Some(state) = state {
                state
                    .ensure_org(&org, membership.org_name.as_deref())
                    .await?;
            }
            Ok(OrgCaller {
                caller,
                org,
                membership,
            })
        })
    }
}

/// What an action needs: a role, or a single permission that grants it.
pub trait Requirement {
    const ROLE: Role;
    const PERMISSION: &'static str;
}

macro_rules! requirement {
    ($(#[$doc:meta])* $name:ident, $role:expr, $permission:literal) => {
        $(#[$doc])*
        pub struct $name;
        impl Requirement for $name {
            const ROLE: Role = $role;
            const PERMISSION: &'static str = $permission;
        }
    };
}

requirement!(
    /// Change org settings.
    ManageSettings, Role::Admin, "settings:manage"
);
requirement!(
    /// Create, change and delete repositories.
    ManageRepositories, Role::Admin, "repos:manage"
);
requirement!(
    /// Registration tokens, drain, revoke.
    ManageAgents, Role::Admin, "agents:manage"
);
requirement!(
    /// Approve or reject jobs.
    ApproveJobs, Role::Admin, "jobs:approve"
);
requirement!(
    /// Reorder queues.
    ReorderJobs, Role::Admin, "jobs:reorder"
);

/// An org member allowed to do `R`. Checked while extracting, before the
/// body is read, so a member without the right gets 403 whatever they send.
pub struct Authorized<R> {
    pub caller: OrgCaller,
    requirement: std::marker::PhantomData<R>,
}

impl<R> std::ops::Deref for Authorized<R> {
    type Target = OrgCaller;
    fn deref(&self) -> &OrgCaller {
        &self.caller
    }
}

impl<R: Requirement + 'static> FromRequest for Authorized<R> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let caller = OrgCaller::from_request(req, payload);
        Box::pin(async move {
            let caller = caller.await?;
            caller.require(R::ROLE, R::PERMISSION)?;
            Ok(Self {
                caller,
                requirement: std::marker::PhantomData,
            })
        })
    }
}
