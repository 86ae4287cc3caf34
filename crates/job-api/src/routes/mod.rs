//! Every `/v1` route, one module per resource, each with a `configure`.

pub mod agents;
pub mod jobs;
pub mod operations;
pub mod orgs;
pub mod queues;
pub mod repositories;
