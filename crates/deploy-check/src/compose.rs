//! `docker-compose.yml` as `docker compose` reads it: every string
//! interpolated (`$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
//! `${VAR-default}`), `<<` merge keys applied, and each service's
//! environment built from its `env_file`s overridden by `environment`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde_yaml::Value;

use crate::{Env, env_file, scalar_string};

#[derive(Clone, Debug)]
pub struct ComposeService {
    pub name: String,
    pub image: Option<String>,
    /// Built from the repository (`build:`).
    pub builds: bool,
    pub command: Vec<String>,
    /// The container's environment: `env_file`s, then `environment`.
    pub environment: Env,
    /// `healthcheck.test`, e.g. `["CMD", "curl", "-fsS", "http://…/readyz"]`.
    pub healthcheck: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct Compose {
    pub services: BTreeMap<String, ComposeService>,
}

impl Compose {
    /// Reads `<root>/docker-compose.yml`, interpolating with `variables`
    /// (what compose would take from the shell and `.env`).
    pub fn load(root: &Path, variables: &Env) -> anyhow::Result<Self> {
        let path = root.join("docker-compose.yml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let mut document: Value = serde_yaml::from_str(&text).context("docker-compose.yml")?;
        document
            .apply_merge()
            .context("docker-compose.yml merge keys")?;
        interpolate_tree(&mut document, variables)?;
        let services = document
            .get("services")
            .and_then(Value::as_mapping)
            .context("docker-compose.yml has no services")?;
        let mut parsed = BTreeMap::new();
        for (name, service) in services {
            let name = name.as_str().context("service name")?.to_owned();
            let service = parse_service(root, &name, service)
                .with_context(|| format!("compose service {name}"))?;
            parsed.insert(name, service);
        }
        Ok(Self { services: parsed })
    }
}

fn parse_service(root: &Path, name: &str, service: &Value) -> anyhow::Result<ComposeService> {
    let mut environment = Env::new();
    let env_files: Vec<String> = match service.get("env_file") {
        None => Vec::new(),
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Sequence(many)) => many
            .iter()
            .map(|v| v.as_str().map(str::to_owned).context("env_file entry"))
            .collect::<anyhow::Result<_>>()?,
        Some(other) => bail!("env_file must be a string or a list, got {other:?}"),
    };
    for file in env_files {
        environment.extend(env_file::read(&root.join(file))?);
    }
    match service.get("environment") {
        None => {}
        Some(Value::Mapping(map)) => {
            for (key, value) in map {
                let key = key.as_str().context("environment key")?;
                let value = scalar_string(value).with_context(|| {
                    format!("{key} has no value (compose would pass the host's through)")
                })?;
                environment.insert(key.to_owned(), value);
            }
        }
        Some(Value::Sequence(list)) => {
            for item in list {
                let item = item.as_str().context("environment entry")?;
                let (key, value) = item
                    .split_once('=')
                    .with_context(|| format!("{item:?} has no value"))?;
                environment.insert(key.to_owned(), value.to_owned());
            }
        }
        Some(other) => bail!("environment must be a mapping or a list, got {other:?}"),
    }
    Ok(ComposeService {
        name: name.to_owned(),
        image: service.get("image").and_then(scalar_string),
        builds: service.get("build").is_some(),
        command: string_list(service.get("command"))?,
        environment,
        healthcheck: match service.get("healthcheck").and_then(|h| h.get("test")) {
            None => None,
            Some(test) => Some(string_list(Some(test))?),
        },
    })
}

/// A command given as a list, or as one string split on whitespace.
fn string_list(value: Option<&Value>) -> anyhow::Result<Vec<String>> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_owned).collect()),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|v| scalar_string(v).context("command entry"))
            .collect(),
        Some(other) => bail!("expected a string or a list, got {other:?}"),
    }
}

fn interpolate_tree(value: &mut Value, variables: &Env) -> anyhow::Result<()> {
    match value {
        Value::String(s) => *s = interpolate(s, variables)?,
        Value::Sequence(items) => {
            for item in items {
                interpolate_tree(item, variables)?;
            }
        }
        Value::Mapping(map) => {
            for (_, item) in map.iter_mut() {
                interpolate_tree(item, variables)?;
            }
        }
        Value::Tagged(tagged) => interpolate_tree(&mut tagged.value, variables)?,
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Compose's variable substitution. `${VAR:-d}` uses `d` when VAR is unset
/// or empty, `${VAR-d}` only when unset; `$$` is a literal `$`.
pub fn interpolate(text: &str, variables: &Env) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix('{') {
            let end = after
                .find('}')
                .with_context(|| format!("unclosed ${{ in {text:?}"))?;
            let expression = &after[..end];
            rest = &after[end + 1..];
            let (name, default, empty_is_unset) = if let Some((n, d)) = expression.split_once(":-")
            {
                (n, Some(d), true)
            } else if let Some((n, d)) = expression.split_once('-') {
                (n, Some(d), false)
            } else {
                (expression, None, false)
            };
            if !is_name(name) {
                bail!("unsupported substitution ${{{expression}}} in {text:?}");
            }
            let value = variables
                .get(name)
                .filter(|v| !(empty_is_unset && v.is_empty()));
            match (value, default) {
                (Some(v), _) => out.push_str(v),
                (None, Some(d)) => out.push_str(&interpolate(d, variables)?),
                (None, None) => {}
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                bail!("a lone `$` in {text:?} (write $$ for a literal $)");
            }
            if let Some(v) = variables.get(&rest[..end]) {
                out.push_str(v);
            }
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Env {
        [("SET", "yes"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn substitution_follows_compose() {
        let v = vars();
        assert_eq!(
            interpolate("a ${SET} $SET b", &v).expect("ok"),
            "a yes yes b"
        );
        assert_eq!(interpolate("${EMPTY:-d}", &v).expect("ok"), "d");
        assert_eq!(interpolate("${EMPTY-d}", &v).expect("ok"), "");
        assert_eq!(interpolate("${UNSET-d}", &v).expect("ok"), "d");
        assert_eq!(interpolate("${UNSET}", &v).expect("ok"), "");
        assert_eq!(
            interpolate("$$(cat f) $$HOME", &v).expect("ok"),
            "$(cat f) $HOME"
        );
        assert!(interpolate("${SET", &v).is_err());
        assert!(interpolate("cost $ 5", &v).is_err());
    }
}
