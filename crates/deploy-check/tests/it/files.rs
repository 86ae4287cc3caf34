//! The deployment files against the code, without running anything.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use deploy_check::binaries::Program;
use deploy_check::compose::{Compose, ComposeService};
use deploy_check::k8s::{Manifests, Workload};
use deploy_check::{Env, env_file, repo_root};
use serde_yaml::Value;

/// `.env.example`: both the `env_file` of the services and, as the brief
/// way to run compose (`cp .env.example .env`), the interpolation source.
pub fn dotenv() -> Env {
    env_file::read(&repo_root().join(".env.example")).expect(".env.example")
}

pub fn compose() -> Compose {
    Compose::load(&repo_root(), &dotenv()).expect("docker-compose.yml")
}

fn manifests() -> Manifests {
    Manifests::load(&repo_root().join("deploy/k8s")).expect("deploy/k8s")
}

/// Compose services running a Switchyard image, with their program.
pub fn switchyard_services(compose: &Compose) -> Vec<(&ComposeService, Program)> {
    compose
        .services
        .values()
        .filter(|s| s.builds || s.image.as_deref() == Some("switchyard:latest"))
        .map(|s| {
            let program = Program::from_command(&s.command).unwrap_or_else(|| {
                panic!(
                    "compose service {}: which program is {:?}?",
                    s.name, s.command
                )
            });
            (s, program)
        })
        .collect()
}

/// One-shot runs of a service binary (`job-api migrate`), not servers.
pub fn is_one_shot(command: &[String]) -> bool {
    command.get(1).is_some_and(|arg| arg == "migrate")
}

/// `command` is what the container runs: one-shot runs listen on nothing.
fn check_environment(what: &str, program: Program, command: &[String], env: &Env) {
    let documented = program.documented_variables();
    for variable in env.keys() {
        assert!(
            documented.contains(variable),
            "{what} gives {} the undocumented variable {variable}",
            program.binary()
        );
    }
    if let Err(problem) = program.check_config(env) {
        panic!("{what} does not configure {}: {problem}", program.binary());
    }
    let listens = if is_one_shot(command) {
        &[][..]
    } else {
        program.listen_variables()
    };
    for variable in listens {
        let address: SocketAddr = env
            .get(*variable)
            .unwrap_or_else(|| panic!("{what} leaves {variable} at its loopback default"))
            .parse()
            .expect("checked by the config parser");
        assert!(
            address.ip().is_unspecified(),
            "{what}: {variable}={address} must bind all interfaces in a container"
        );
    }
}

fn port_of(env: &Env, variable: &str) -> u16 {
    env[variable]
        .parse::<SocketAddr>()
        .unwrap_or_else(|_| panic!("{variable} is not an address"))
        .port()
}

#[test]
fn compose_gives_every_program_documented_variables_and_a_working_configuration() {
    let compose = compose();
    let services = switchyard_services(&compose);
    for (service, program) in &services {
        check_environment(
            &format!("compose service {}", service.name),
            *program,
            &service.command,
            &service.environment,
        );
    }
    let running: BTreeSet<Program> = services
        .iter()
        .filter(|(s, _)| !is_one_shot(&s.command))
        .map(|(_, p)| *p)
        .collect();
    for program in Program::SERVICES {
        assert!(
            running.contains(&program),
            "compose runs no {}",
            program.binary()
        );
    }
    let migrate = &compose.services["migrate"];
    assert_eq!(migrate.command, ["job-api", "migrate"]);
}

#[test]
fn compose_health_checks_every_service_on_its_readiness_endpoint() {
    let compose = compose();
    for (service, program) in switchyard_services(&compose) {
        let Some(ops) = program.ops_address_variable() else {
            continue;
        };
        if is_one_shot(&service.command) {
            continue;
        }
        let test = service
            .healthcheck
            .as_ref()
            .unwrap_or_else(|| panic!("compose service {} has no healthcheck", service.name));
        let url = format!(
            "http://127.0.0.1:{}/readyz",
            port_of(&service.environment, ops)
        );
        assert!(
            test.first().is_some_and(|t| t == "CMD" || t == "CMD-SHELL") && test.contains(&url),
            "compose service {}: healthcheck {test:?} does not ask {url}",
            service.name
        );
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let dir = repo_root().join("deploy/k8s");
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    let kustomization: Value = serde_yaml::from_str(&text).expect("parse kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_owned())
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("list deploy/k8s")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| (f.ends_with(".yaml") || f.ends_with(".yml")) && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn k8s_settings_are_documented_placeholders_and_configure_every_workload() {
    let manifests = manifests();
    let documented = Program::JobApi.documented_variables();
    for kind in ["ConfigMap", "Secret"] {
        for manifest in manifests.of_kind(kind) {
            let values = manifests.key_values(kind, &manifest.name).expect("values");
            for (key, value) in &values {
                assert!(
                    documented.contains(key),
                    "{} sets the undocumented {key}",
                    manifest.describe()
                );
                // A template only: a value is empty or visibly an example.
                if kind == "Secret" {
                    assert!(
                        value.is_empty()
                            || value.contains("REPLACE_ME")
                            || value.contains("example."),
                        "{}: {key} looks like a real value; keep placeholders only",
                        manifest.describe()
                    );
                }
            }
        }
    }
    let workloads = manifests.workloads().expect("workloads");
    let mut deployed = BTreeSet::new();
    for workload in &workloads {
        for container in &workload.containers {
            let what = format!(
                "{} container {}",
                workload.manifest.describe(),
                container.name
            );
            let program = Program::from_command(&container.command)
                .unwrap_or_else(|| panic!("{what}: which program is {:?}?", container.command));
            check_environment(&what, program, &container.command, &container.env);
            if workload.manifest.kind == "Deployment" {
                deployed.insert(program);
            }
        }
    }
    for program in Program::SERVICES {
        assert!(
            deployed.contains(&program),
            "no Deployment runs {}",
            program.binary()
        );
    }
    let migrations: Vec<&Workload> = workloads
        .iter()
        .filter(|w| w.manifest.kind == "Job")
        .filter(|w| {
            w.containers
                .iter()
                .any(|c| c.command == ["job-api", "migrate"])
        })
        .collect();
    assert_eq!(migrations.len(), 1, "one Job runs `job-api migrate`");
}

fn grace_needed(env: &Env, container: &Value) -> u64 {
    let drain: u64 = env
        .get("HTTP_SHUTDOWN_TIMEOUT_SECS")
        .map_or(Ok(25), |v| v.parse())
        .expect("HTTP_SHUTDOWN_TIMEOUT_SECS is a number");
    let pre_stop: u64 = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .filter(|c| c.first().and_then(Value::as_str) == Some("sleep"))
        .and_then(|c| c.get(1))
        .and_then(Value::as_str)
        .map_or(0, |s| s.parse().expect("preStop sleep seconds"));
    drain + pre_stop
}

#[test]
fn k8s_deployments_are_probed_bounded_confined_and_protected() {
    let manifests = manifests();
    for workload in manifests.workloads().expect("workloads") {
        let pod = &workload.pod_spec;
        let what = workload.manifest.describe();
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"],
            Value::Bool(true),
            "{what}"
        );
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(10001),
            "{what}: the image's user"
        );
        for container in &workload.containers {
            let spec = &container.spec;
            assert_eq!(
                spec["securityContext"]["readOnlyRootFilesystem"],
                Value::Bool(true),
                "{what}: read-only root file system"
            );
            assert_eq!(
                spec["securityContext"]["allowPrivilegeEscalation"],
                Value::Bool(false),
                "{what}"
            );
            for resource in ["cpu", "memory"] {
                assert!(
                    !spec["resources"]["requests"][resource].is_null(),
                    "{what}: no {resource} request"
                );
            }
            assert!(
                !spec["resources"]["limits"]["memory"].is_null(),
                "{what}: no memory limit"
            );
        }
        if workload.manifest.kind != "Deployment" {
            continue;
        }
        let container = &workload.containers[0];
        let program = Program::from_command(&container.command).expect("program");
        let ops = program.ops_address_variable().expect("a service");
        let port = port_of(&container.env, ops);
        assert_eq!(
            container
                .readiness
                .as_ref()
                .map(|p| (p.path.as_str(), p.port)),
            Some(("/readyz", port)),
            "{what}: readiness probe on {ops}"
        );
        assert_eq!(
            container
                .liveness
                .as_ref()
                .map(|p| (p.path.as_str(), p.port)),
            Some(("/healthz", port)),
            "{what}: liveness probe on {ops}"
        );
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let needed = grace_needed(&container.env, &container.spec);
        assert!(
            grace > needed,
            "{what}: terminationGracePeriodSeconds {grace} must exceed preStop + HTTP_SHUTDOWN_TIMEOUT_SECS ({needed})"
        );
        let budgets: Vec<_> = manifests
            .of_kind("PodDisruptionBudget")
            .filter(|pdb| workload.selected_by(pdb.document["spec"].get("selector")))
            .collect();
        assert_eq!(budgets.len(), 1, "{what}: one PodDisruptionBudget");
        let exposed: BTreeSet<u16> = manifests
            .of_kind("Service")
            .filter(|s| {
                let selector = s.document["spec"]["selector"].clone();
                let mut wrapped = serde_yaml::Mapping::new();
                wrapped.insert("matchLabels".into(), selector);
                workload.selected_by(Some(&Value::Mapping(wrapped)))
            })
            .flat_map(|s| {
                s.document["spec"]["ports"]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|p| match &p["targetPort"] {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Value::String(name) => container.ports.get(name).copied(),
                _ => p["port"].as_u64().and_then(|n| u16::try_from(n).ok()),
            })
            .collect();
        for variable in program.listen_variables() {
            let port = port_of(&container.env, variable);
            assert!(
                exposed.contains(&port),
                "{what}: no Service reaches {variable} (port {port})"
            );
        }
    }
}

#[test]
fn the_gateway_has_a_headless_service_for_grpc_balancing() {
    let manifests = manifests();
    let headless = manifests
        .of_kind("Service")
        .filter(|s| s.document["spec"]["clusterIP"].as_str() == Some("None"))
        .find(|s| s.document["spec"]["selector"]["app.kubernetes.io/name"] == "agent-gateway");
    assert!(headless.is_some(), "agent-gateway needs a headless Service");
}

/// PostgreSQL's default `max_connections` (100) less its default
/// `superuser_reserved_connections` (3).
const DEFAULT_CONNECTION_BUDGET: u64 = 97;

#[test]
fn k8s_pools_fit_a_default_postgresql_at_full_scale_during_a_rollout() {
    let manifests = manifests();
    let mut total = 0;
    for workload in manifests.workloads().expect("workloads") {
        let spec = &workload.manifest.document["spec"];
        if workload.manifest.kind == "Job" {
            // `migrate` holds one connection, not a pool.
            total += 1;
            continue;
        }
        let replicas = spec["replicas"].as_u64().unwrap_or(1);
        let autoscaled = manifests
            .of_kind("HorizontalPodAutoscaler")
            .filter(|h| {
                h.document["spec"]["scaleTargetRef"]["name"] == workload.manifest.name.as_str()
            })
            .filter_map(|h| h.document["spec"]["maxReplicas"].as_u64())
            .max()
            .unwrap_or(0);
        let most = replicas.max(autoscaled);
        let surge = match &spec["strategy"]["rollingUpdate"]["maxSurge"] {
            Value::Number(n) => n.as_u64().expect("maxSurge"),
            Value::String(percent) => {
                let p: u64 = percent.trim_end_matches('%').parse().expect("maxSurge %");
                (most * p).div_ceil(100)
            }
            _ => most.div_ceil(4), // Kubernetes' default: 25 %
        };
        let pods = most + surge;
        for container in &workload.containers {
            let pool: u64 = container
                .env
                .get("DATABASE_POOL_SIZE")
                .map_or(Ok(16), |v| v.parse())
                .expect("DATABASE_POOL_SIZE is a number");
            total += pods * pool;
        }
    }
    assert!(
        total <= DEFAULT_CONNECTION_BUDGET,
        "the pools may open {total} PostgreSQL connections; keep it within {DEFAULT_CONNECTION_BUDGET} or document a higher max_connections"
    );
}
