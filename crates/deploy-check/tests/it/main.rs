//! The deployment files (docker-compose.yml, deploy/k8s) held to the code.

mod files;
mod processes;
mod support;
