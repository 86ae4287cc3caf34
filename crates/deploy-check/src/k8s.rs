//! The Kubernetes manifests in `deploy/k8s`: every YAML document of every
//! file, and for each workload's containers the environment Kubernetes
//! would give them (`envFrom` ConfigMaps and Secrets in order, then `env`,
//! which wins), their named ports and their probes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_yaml::Value;

use crate::{Env, scalar_string};

/// What a `fieldRef` variable is set to here (its real value is only known
/// in a running pod).
pub const FIELD_REF_STAND_IN: &str = "field-ref-value";

#[derive(Clone, Debug)]
pub struct Manifest {
    pub file: PathBuf,
    pub kind: String,
    pub name: String,
    pub document: Value,
}

impl Manifest {
    pub fn describe(&self) -> String {
        format!("{} {} ({})", self.kind, self.name, self.file.display())
    }
}

#[derive(Clone, Debug)]
pub struct Manifests {
    pub dir: PathBuf,
    pub all: Vec<Manifest>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub path: String,
    /// The port number, named ports resolved against the container's.
    pub port: u16,
}

#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    /// `command` followed by `args`.
    pub command: Vec<String>,
    pub env: Env,
    pub ports: BTreeMap<String, u16>,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub spec: Value,
}

/// A Deployment or Job: its pod template and containers.
#[derive(Clone, Debug)]
pub struct Workload {
    pub manifest: Manifest,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_spec: Value,
    pub containers: Vec<Container>,
}

impl Manifests {
    /// Every `*.yaml` / `*.yml` file of `dir`, each possibly several documents.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("list {}", dir.display()))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")));
        files.sort();
        let mut all = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            for document in serde_yaml::Deserializer::from_str(&text) {
                let document = Value::deserialize(document)
                    .with_context(|| format!("parse {}", file.display()))?;
                if document.is_null() {
                    continue;
                }
                let kind = document
                    .get("kind")
                    .and_then(Value::as_str)
                    .with_context(|| format!("a document without kind in {}", file.display()))?
                    .to_owned();
                let name = document
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                all.push(Manifest {
                    file: file.clone(),
                    kind,
                    name,
                    document,
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            all,
        })
    }

    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Manifest> + 'a {
        self.all.iter().filter(move |m| m.kind == kind)
    }

    pub fn find(&self, kind: &str, name: &str) -> Option<&Manifest> {
        self.all.iter().find(|m| m.kind == kind && m.name == name)
    }

    /// A ConfigMap's `data`, or a Secret's `stringData` (templates here
    /// keep values readable; base64 `data` is refused so nothing is hidden).
    pub fn key_values(&self, kind: &str, name: &str) -> anyhow::Result<Env> {
        let manifest = self
            .find(kind, name)
            .with_context(|| format!("no {kind} named {name}"))?;
        let field = if kind == "Secret" {
            if manifest.document.get("data").is_some() {
                bail!(
                    "{}: use stringData with placeholders, not data",
                    manifest.describe()
                );
            }
            "stringData"
        } else {
            "data"
        };
        let mut env = Env::new();
        if let Some(map) = manifest.document.get(field).and_then(Value::as_mapping) {
            for (key, value) in map {
                let key = key.as_str().context("key")?;
                let value = scalar_string(value)
                    .with_context(|| format!("{}: {key} is not a string", manifest.describe()))?;
                env.insert(key.to_owned(), value);
            }
        }
        Ok(env)
    }

    /// Deployments and Jobs, with their containers' environments resolved.
    pub fn workloads(&self) -> anyhow::Result<Vec<Workload>> {
        let mut workloads = Vec::new();
        for manifest in self
            .all
            .iter()
            .filter(|m| matches!(m.kind.as_str(), "Deployment" | "Job"))
        {
            let template = manifest
                .document
                .get("spec")
                .and_then(|s| s.get("template"))
                .with_context(|| format!("{} has no pod template", manifest.describe()))?;
            let pod_labels = string_map(template.get("metadata").and_then(|m| m.get("labels")));
            let pod_spec = template
                .get("spec")
                .cloned()
                .with_context(|| format!("{} has no pod spec", manifest.describe()))?;
            let containers = pod_spec
                .get("containers")
                .and_then(Value::as_sequence)
                .with_context(|| format!("{} has no containers", manifest.describe()))?
                .iter()
                .map(|c| self.container(c))
                .collect::<anyhow::Result<_>>()
                .with_context(|| manifest.describe())?;
            workloads.push(Workload {
                manifest: manifest.clone(),
                pod_labels,
                pod_spec,
                containers,
            });
        }
        Ok(workloads)
    }

    fn container(&self, spec: &Value) -> anyhow::Result<Container> {
        let name = spec
            .get("name")
            .and_then(Value::as_str)
            .context("container without name")?
            .to_owned();
        let mut command = strings(spec.get("command"));
        command.extend(strings(spec.get("args")));
        let mut env = Env::new();
        for source in spec
            .get("envFrom")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if source.get("prefix").is_some() {
                bail!("{name}: envFrom prefix is not supported here");
            }
            if let Some(r) = source.get("configMapRef") {
                env.extend(self.key_values("ConfigMap", reference_name(r)?)?);
            } else if let Some(r) = source.get("secretRef") {
                env.extend(self.key_values("Secret", reference_name(r)?)?);
            } else {
                bail!("{name}: unknown envFrom source {source:?}");
            }
        }
        for variable in spec
            .get("env")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let key = variable
                .get("name")
                .and_then(Value::as_str)
                .context("env entry without name")?;
            let value = if let Some(value) = variable.get("value") {
                scalar_string(value).with_context(|| format!("{key}: value"))?
            } else if let Some(from) = variable.get("valueFrom") {
                self.value_from(from)
                    .with_context(|| format!("{name}: {key}"))?
            } else {
                String::new()
            };
            env.insert(key.to_owned(), value);
        }
        let ports: BTreeMap<String, u16> = spec
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let number = p.get("containerPort")?.as_u64()?;
                let port_name = p.get("name")?.as_str()?;
                Some((port_name.to_owned(), u16::try_from(number).ok()?))
            })
            .collect();
        let probe = |field: &str| -> anyhow::Result<Option<Probe>> {
            let Some(http) = spec.get(field).and_then(|p| p.get("httpGet")) else {
                return Ok(None);
            };
            let path = http
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_owned();
            let port = match http.get("port") {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .context("port number")?,
                Some(Value::String(named)) => *ports
                    .get(named)
                    .with_context(|| format!("{name}: {field} names unknown port {named}"))?,
                _ => bail!("{name}: {field} has no port"),
            };
            Ok(Some(Probe { path, port }))
        };
        Ok(Container {
            readiness: probe("readinessProbe")?,
            liveness: probe("livenessProbe")?,
            name,
            command,
            env,
            ports,
            spec: spec.clone(),
        })
    }

    fn value_from(&self, from: &Value) -> anyhow::Result<String> {
        let keyed = |kind: &str, r: &Value| -> anyhow::Result<String> {
            let key = r.get("key").and_then(Value::as_str).context("no key")?;
            self.key_values(kind, reference_name(r)?)?
                .remove(key)
                .with_context(|| format!("{kind} has no key {key}"))
        };
        if let Some(r) = from.get("configMapKeyRef") {
            keyed("ConfigMap", r)
        } else if let Some(r) = from.get("secretKeyRef") {
            keyed("Secret", r)
        } else if from.get("fieldRef").is_some() || from.get("resourceFieldRef").is_some() {
            Ok(FIELD_REF_STAND_IN.to_owned())
        } else {
            bail!("unknown valueFrom {from:?}")
        }
    }
}

impl Workload {
    /// Whether a label selector's `matchLabels` selects this workload's pods.
    pub fn selected_by(&self, selector: Option<&Value>) -> bool {
        let wanted = string_map(selector.and_then(|s| s.get("matchLabels")));
        !wanted.is_empty()
            && wanted
                .iter()
                .all(|(k, v)| self.pod_labels.get(k) == Some(v))
    }
}

fn reference_name(reference: &Value) -> anyhow::Result<&str> {
    reference
        .get("name")
        .and_then(Value::as_str)
        .context("reference without name")
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(scalar_string)
        .collect()
}

pub fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar_string(v)?)))
        .collect()
}
