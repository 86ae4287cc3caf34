//! Results: one row per measured case, printed as a Markdown table and
//! written as JSON. Each row carries the baseline it is compared with (a
//! figure measured in the same run, or a target from issue #8) and the ratio.

use serde::Serialize;
use serde_json::Value;

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub case: String,
    /// The headline number and its unit ("jobs/s", "ms p99", ...).
    pub value: f64,
    pub unit: String,
    /// Human-readable result (may hold several numbers).
    pub result: String,
    pub baseline: Option<Baseline>,
    /// value / baseline.value (for latencies and memory: lower is better).
    pub ratio: Option<f64>,
    pub detail: Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub name: String,
    pub value: f64,
}

#[derive(Default, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Value,
    pub baselines: Vec<Baseline>,
    pub rows: Vec<Row>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn baseline(&self, name: &str) -> Option<Baseline> {
        self.baselines.iter().find(|b| b.name == name).cloned()
    }

    pub fn add_baseline(&mut self, name: &str, value: f64) {
        self.baselines.retain(|b| b.name != name);
        self.baselines.push(Baseline {
            name: name.to_owned(),
            value,
        });
    }

    /// Adds a row compared with the first of `baselines` that is known.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        scenario: &str,
        case: &str,
        value: f64,
        unit: &str,
        result: String,
        baselines: &[&str],
        detail: Value,
    ) {
        let baseline = baselines.iter().find_map(|b| self.baseline(b));
        let ratio = baseline
            .as_ref()
            .filter(|b| b.value > 0.0)
            .map(|b| value / b.value);
        eprintln!("yard-bench: {scenario} {case}: {result}");
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            case: case.to_owned(),
            value,
            unit: unit.to_owned(),
            result,
            baseline,
            ratio,
            detail,
        });
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| scenario | case | result | vs baseline (same run) |\n|---|---|---|---|\n",
        );
        for r in &self.rows {
            let versus = match (&r.baseline, r.ratio) {
                (Some(b), Some(ratio)) if ratio < 0.1 => {
                    format!("{ratio:.3}× {} ({})", b.name, human(b.value))
                }
                (Some(b), Some(ratio)) => format!("{ratio:.2}× {} ({})", b.name, human(b.value)),
                _ => "—".to_owned(),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                r.scenario, r.case, r.result, versus
            ));
        }
        for f in &self.failures {
            out.push_str(&format!("| FAILED | {f} | | |\n"));
        }
        out
    }
}

/// 12345.6 → "12,346"; small values keep a decimal.
pub fn human(v: f64) -> String {
    if v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if n < 0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_take_the_first_known_baseline() {
        let mut report = Report::default();
        report.add_baseline("b", 200.0);
        report.push(
            "s",
            "c",
            100.0,
            "jobs/s",
            "100 jobs/s".into(),
            &["a", "b"],
            Value::Null,
        );
        assert_eq!(report.rows[0].ratio, Some(0.5));
        assert!(report.markdown().contains("0.50× b (200)"));
        assert_eq!(human(1234567.0), "1,234,567");
        assert_eq!(human(3.25), "3.2");
    }
}
