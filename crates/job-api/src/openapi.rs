//! The OpenAPI 3.1 document (`/openapi.json`) and Swagger UI (`/docs`),
//! whose assets are compiled into the binary: no CDN, no download at build.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{agents, jobs, operations, orgs, queues, repositories};
use crate::views;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchyard job-api", description = "Submit, follow and manage jobs run by remote agents. Errors are RFC 9457 problem+json."),
    paths(
        orgs::list_orgs, orgs::get_settings, orgs::update_settings,
        repositories::create_repository, repositories::list_repositories, repositories::get_repository,
        repositories::update_repository, repositories::delete_repository,
        jobs::create_job, jobs::create_jobs_batch, jobs::list_jobs, jobs::get_job, jobs::get_job_logs,
        jobs::cancel_job, jobs::retry_job, jobs::approve_job, jobs::reject_job,
        agents::create_registration_token, agents::list_agents, agents::get_agent, agents::drain_agent,
        agents::revoke_agent,
        operations::list_dead_letters, operations::redrive_dead_letter, operations::list_audit_events,
        operations::get_system,
        queues::list_queues, queues::get_queue, queues::reorder_queue, queues::get_stats,
    ),
    components(schemas(
        views::CreateJob, views::CreateJobs, views::JobView, views::JobDetail, views::JobPage, views::JobList,
        views::LogPage, views::LogLineView, views::AttemptView, views::LeaseView, views::ProblemDoc,
        views::FieldErrorDoc,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;
