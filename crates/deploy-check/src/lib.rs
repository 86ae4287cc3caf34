//! Reads the deployment files the way their tools do, so tests can hold
//! them to the code:
//!
//! * [`compose`]: `docker-compose.yml` with `${VAR:-default}` interpolation,
//!   `<<` merge keys and `env_file`, giving each service its environment.
//! * [`k8s`]: every manifest in `deploy/k8s`, with each workload's
//!   environment assembled from its ConfigMaps, Secrets and `env`.
//! * [`binaries`]: what each Switchyard program reads, checked with the
//!   programs' own configuration parsers (not a copy of their rules).

pub mod binaries;
pub mod compose;
pub mod env_file;
pub mod k8s;

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A process environment: variable name to value.
pub type Env = BTreeMap<String, String>;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A YAML scalar as the string a container would see in its environment.
pub fn scalar_string(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
