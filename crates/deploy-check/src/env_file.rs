//! `.env`-style files as compose reads them for `env_file`: `KEY=VALUE`
//! lines; blank lines and `#` comments skipped; one pair of surrounding
//! quotes removed.

use anyhow::{Context, bail};

use crate::Env;

pub fn parse(text: &str) -> anyhow::Result<Env> {
    let mut env = Env::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("line {}: no `=` in {line:?}", number + 1))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("line {}: bad variable name {key:?}", number + 1);
        }
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| {
                value
                    .strip_prefix(*q)
                    .and_then(|v| v.strip_suffix(*q))
                    .filter(|_| value.len() >= 2)
            })
            .unwrap_or(value);
        env.insert(key.to_owned(), unquoted.to_owned());
    }
    Ok(env)
}

pub fn read(path: &std::path::Path) -> anyhow::Result<Env> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse(&text).with_context(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_blanks_and_quotes() {
        let env = parse("# c\n\nA=1\nB=\nC=\"x y\"\nD='z'\nE=a=b\n").expect("parse");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "");
        assert_eq!(env["C"], "x y");
        assert_eq!(env["D"], "z");
        assert_eq!(env["E"], "a=b");
        assert!(parse("no equals sign").is_err());
    }
}
