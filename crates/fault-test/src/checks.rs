//! The end-of-run checks, against what PostgreSQL (the truth) holds.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Client;
use uuid::Uuid;

use crate::stale::StaleProbe;
use crate::watcher::{SeenLine, Watched};

pub const TERMINAL: [&str; 5] = ["succeeded", "failed", "cancelled", "timed_out", "dead"];

/// What a job was made to do, and so what it must end as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Prints its lines and exits 0.
    Normal,
    /// Fails its first attempt (exit 1 after its lines), succeeds on a retry.
    Flaky,
    /// Always exits 3; two attempts allowed, then dead-lettered.
    Doomed,
    /// A recovery probe: prints one line.
    Probe,
}

impl Kind {
    pub fn expected_status(self) -> &'static str {
        match self {
            Kind::Normal | Kind::Flaky | Kind::Probe => "succeeded",
            Kind::Doomed => "dead",
        }
    }

    pub fn expected_lines(self, lines: usize) -> Vec<String> {
        match self {
            Kind::Probe => vec!["probe".to_owned()],
            _ => (1..=lines).map(|i| format!("line {i}")).collect(),
        }
    }
}

#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
    /// A failure here is a known, reported service issue: shown as WARN
    /// and not failing the run unless `YARD_FAULT_STRICT=1`.
    pub known_issue: bool,
}

impl Check {
    fn new(name: &str, failures: &[String], ok_detail: String) -> Self {
        Self {
            name: name.to_owned(),
            pass: failures.is_empty(),
            known_issue: false,
            detail: if failures.is_empty() {
                ok_detail
            } else {
                let mut shown: Vec<String> = failures.iter().take(5).cloned().collect();
                if failures.len() > 5 {
                    shown.push(format!("… and {} more", failures.len() - 5));
                }
                shown.join("; ")
            },
        }
    }
}

#[derive(Debug)]
pub struct JobRow {
    pub status: String,
    pub epoch: i64,
}

#[derive(Debug, Clone)]
pub struct StoredLine {
    pub seq: i64,
    pub epoch: i64,
    pub stream: String,
    pub line: String,
}

pub struct Snapshot {
    pub jobs: HashMap<Uuid, JobRow>,
    /// Per job: epoch → outcome.
    pub attempts: HashMap<Uuid, BTreeMap<i64, String>>,
    pub logs: HashMap<Uuid, Vec<StoredLine>>,
}

pub async fn snapshot(db: &Client, org: &str) -> anyhow::Result<Snapshot> {
    let mut jobs = HashMap::new();
    for row in db
        .query(
            "SELECT id::text, status, lease_epoch FROM jobs WHERE org_id = $1",
            &[&org],
        )
        .await?
    {
        jobs.insert(
            row.get::<_, String>(0).parse()?,
            JobRow {
                status: row.get(1),
                epoch: row.get(2),
            },
        );
    }
    let mut attempts: HashMap<Uuid, BTreeMap<i64, String>> = HashMap::new();
    for row in db
        .query(
            "SELECT a.job_id::text, a.epoch, a.outcome FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE j.org_id = $1",
            &[&org],
        )
        .await?
    {
        attempts
            .entry(row.get::<_, String>(0).parse()?)
            .or_default()
            .insert(row.get(1), row.get(2));
    }
    let mut logs: HashMap<Uuid, Vec<StoredLine>> = HashMap::new();
    for row in db
        .query(
            "SELECT l.job_id::text, l.seq, l.epoch, l.stream, l.line FROM job_logs l \
             JOIN jobs j ON j.id = l.job_id WHERE j.org_id = $1 ORDER BY l.job_id, l.seq",
            &[&org],
        )
        .await?
    {
        logs.entry(row.get::<_, String>(0).parse()?)
            .or_default()
            .push(StoredLine {
                seq: row.get(1),
                epoch: row.get(2),
                stream: row.get(3),
                line: row.get(4),
            });
    }
    Ok(Snapshot {
        jobs,
        attempts,
        logs,
    })
}

pub fn run_all(
    snap: &Snapshot,
    kinds: &HashMap<Uuid, Kind>,
    lines_per_job: usize,
    watched: &[Watched],
    stale: Option<&anyhow::Result<StaleProbe>>,
) -> Vec<Check> {
    let mut checks = Vec::new();

    // Every job submitted exists and reached a terminal state.
    let mut failures = Vec::new();
    for id in kinds.keys() {
        match snap.jobs.get(id) {
            None => failures.push(format!("job {id} is missing")),
            Some(job) if !TERMINAL.contains(&job.status.as_str()) => {
                failures.push(format!("job {id} is still {}", job.status))
            }
            Some(_) => {}
        }
    }
    checks.push(Check::new(
        "every job reached a terminal state",
        &failures,
        format!("{} jobs", kinds.len()),
    ));

    // And the one it was made to reach.
    let mut failures = Vec::new();
    for (id, kind) in kinds {
        if let Some(job) = snap.jobs.get(id)
            && job.status != kind.expected_status()
        {
            failures.push(format!(
                "{kind:?} job {id} ended {} (expected {})",
                job.status,
                kind.expected_status()
            ));
        }
    }
    checks.push(Check::new(
        "every job ended as its command dictates",
        &failures,
        "succeeded, or dead after its retries for the always-failing ones".into(),
    ));

    // No job completed twice, and no result from a stale epoch.
    let mut failures = Vec::new();
    let mut attempts_total = 0;
    for (id, job) in &snap.jobs {
        let empty = BTreeMap::new();
        let attempts = snap.attempts.get(id).unwrap_or(&empty);
        attempts_total += attempts.len();
        let succeeded: Vec<i64> = attempts
            .iter()
            .filter(|(_, outcome)| *outcome == "succeeded")
            .map(|(epoch, _)| *epoch)
            .collect();
        match (job.status.as_str(), succeeded.as_slice()) {
            ("succeeded", [epoch]) if *epoch == job.epoch => {}
            ("succeeded", _) => failures.push(format!(
                "succeeded job {id} at epoch {} has succeeded attempts at epochs {succeeded:?}",
                job.epoch
            )),
            (_, []) => {}
            (status, _) => failures.push(format!(
                "{status} job {id} has succeeded attempts at {succeeded:?}"
            )),
        }
        if let Some((&last, _)) = attempts.last_key_value()
            && last > job.epoch
        {
            failures.push(format!(
                "job {id} has an attempt at epoch {last} above its epoch {}",
                job.epoch
            ));
        }
    }
    checks.push(Check::new(
        "no job completed twice; each success is the current epoch's",
        &failures,
        format!("{} jobs, {attempts_total} attempts", snap.jobs.len()),
    ));

    // Log fencing: gapless seq, epochs never going back, every line from an
    // epoch that was leased; each attempt's output a prefix of the job's
    // (no line stored twice), complete for attempts that ran to the end.
    let mut failures = Vec::new();
    let mut unrecorded = Vec::new();
    let mut lines_total = 0;
    for (id, job) in &snap.jobs {
        let Some(lines) = snap.logs.get(id) else {
            if kinds.contains_key(id) && job.status == "succeeded" {
                failures.push(format!("succeeded job {id} has no log lines"));
            }
            continue;
        };
        lines_total += lines.len();
        let attempts = snap.attempts.get(id);
        let mut previous_epoch = 0;
        let mut per_epoch: BTreeMap<i64, Vec<&StoredLine>> = BTreeMap::new();
        for (i, line) in lines.iter().enumerate() {
            if line.seq != i as i64 + 1 {
                failures.push(format!("job {id}: seq {} at position {}", line.seq, i + 1));
                break;
            }
            if line.epoch < previous_epoch {
                failures.push(format!(
                    "job {id}: line {} from epoch {} after a line from epoch {previous_epoch}",
                    line.seq, line.epoch
                ));
            }
            previous_epoch = line.epoch;
            if line.epoch > job.epoch {
                failures.push(format!(
                    "job {id}: line {} from epoch {}, above the job's epoch {}",
                    line.seq, line.epoch, job.epoch
                ));
            }
            if !attempts.is_some_and(|a| a.contains_key(&line.epoch)) {
                unrecorded.push(format!(
                    "job {id}: lines from epoch {}, which has no attempt row",
                    line.epoch
                ));
            }
            per_epoch.entry(line.epoch).or_default().push(line);
        }
        let Some(kind) = kinds.get(id) else { continue };
        let expected = kind.expected_lines(lines_per_job);
        for (epoch, got) in &per_epoch {
            let text: Vec<&str> = got.iter().map(|l| l.line.as_str()).collect();
            let prefix = text.len() <= expected.len()
                && text.iter().zip(&expected).all(|(a, b)| *a == b)
                && got.iter().all(|l| l.stream == "stdout");
            let outcome = attempts.and_then(|a| a.get(epoch)).map(String::as_str);
            let ran_to_end = matches!(outcome, Some("succeeded" | "failed"));
            if !prefix || (ran_to_end && text.len() != expected.len()) {
                failures.push(format!(
                    "job {id} epoch {epoch} ({outcome:?}): {} lines, not the expected {}: {:?}",
                    text.len(),
                    if ran_to_end {
                        "complete output"
                    } else {
                        "prefix"
                    },
                    text.iter().take(3).collect::<Vec<_>>()
                ));
            }
        }
        if job.status == "succeeded"
            && per_epoch.get(&job.epoch).map_or(0, Vec::len) != expected.len()
        {
            failures.push(format!(
                "succeeded job {id}: its accepted epoch {} lacks lines",
                job.epoch
            ));
        }
    }
    checks.push(Check::new(
        "log lines fenced by epoch, none stored twice",
        &failures,
        format!("{lines_total} stored lines"),
    ));
    // Known issue: a lease the agent acknowledged on a gateway that died
    // before storing the ack stays `leased`; when the agent resumes through
    // the other gateway it is told the lease is stale (a leased job's lease
    // cannot be extended) although its output at that epoch is accepted;
    // the lease then ends as `released`, which writes no attempt row.
    unrecorded.dedup();
    let mut record = Check::new(
        "every epoch with stored output has an attempt row",
        &unrecorded,
        "all output belongs to recorded attempts".into(),
    );
    record.known_issue = true;
    checks.push(record);

    // The deliberate stale write.
    let (failures, detail) = match stale {
        None => (vec!["did not run".to_owned()], String::new()),
        Some(Err(e)) => (vec![format!("{e:#}")], String::new()),
        Some(Ok(probe)) => {
            let mut failures = Vec::new();
            if probe.stale_log_status != 409 {
                failures.push(format!(
                    "stale log write answered {}",
                    probe.stale_log_status
                ));
            }
            if probe.stale_result_status != 409 {
                failures.push(format!(
                    "stale result answered {}",
                    probe.stale_result_status
                ));
            }
            let job = snap.jobs.get(&probe.job);
            if job.is_none_or(|j| j.status != "succeeded" || j.epoch != probe.current_epoch as i64)
            {
                failures.push(format!(
                    "stale-probe job ended {job:?}, expected succeeded at epoch {}",
                    probe.current_epoch
                ));
            }
            let outcomes = snap.attempts.get(&probe.job);
            let stale_outcome = outcomes.and_then(|a| a.get(&(probe.stale_epoch as i64)));
            if stale_outcome.is_some_and(|o| o == "succeeded") {
                failures.push("the stale epoch's attempt is recorded as succeeded".into());
            }
            let logs = snap.logs.get(&probe.job).cloned().unwrap_or_default();
            if logs.iter().any(|l| l.line.contains("STALE")) {
                failures.push("the stale log line was stored".into());
            }
            (
                failures,
                format!(
                    "epoch {} → {}: stale log 409, stale result 409; stale attempt {:?}",
                    probe.stale_epoch, probe.current_epoch, stale_outcome
                ),
            )
        }
    };
    checks.push(Check::new(
        "deliberate stale write refused (HTTP pull API)",
        &failures,
        detail,
    ));

    // Watchers: every line exactly once, in order, as stored; then the
    // terminal status the job has.
    let mut failures = Vec::new();
    let mut lines_seen = 0;
    for watch in watched {
        lines_seen += watch.lines.len();
        failures.extend(watch.violations.iter().cloned());
        let stored: Vec<SeenLine> = snap
            .logs
            .get(&watch.job)
            .into_iter()
            .flatten()
            .map(|l| SeenLine {
                seq: l.seq,
                stream: l.stream.clone(),
                line: l.line.clone(),
            })
            .collect();
        if watch.lines != stored {
            failures.push(format!(
                "job {}: watcher saw {} lines, PostgreSQL holds {}",
                watch.job,
                watch.lines.len(),
                stored.len()
            ));
        }
        let status = snap.jobs.get(&watch.job).map(|j| j.status.as_str());
        if watch.terminal.as_deref() != status {
            failures.push(format!(
                "job {}: watcher's terminal status {:?}, PostgreSQL {status:?}",
                watch.job, watch.terminal
            ));
        }
    }
    let reconnects: u32 = watched
        .iter()
        .map(|w| w.connections.saturating_sub(1))
        .sum();
    checks.push(Check::new(
        "watchers saw every line once, in order, then the terminal status",
        &failures,
        format!(
            "{} watchers, {lines_seen} lines, {reconnects} reconnects",
            watched.len()
        ),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: usize = 3;

    /// One normal job that ran twice: epoch 1 lost after one line, epoch 2
    /// succeeded with all three; and a watcher that saw all four lines.
    fn clean() -> (Snapshot, HashMap<Uuid, Kind>, Vec<Watched>, Uuid) {
        let id = Uuid::new_v4();
        let stored = [
            (1, 1, "line 1"),
            (2, 2, "line 1"),
            (3, 2, "line 2"),
            (4, 2, "line 3"),
        ];
        let logs: Vec<StoredLine> = stored
            .iter()
            .map(|(seq, epoch, line)| StoredLine {
                seq: *seq,
                epoch: *epoch,
                stream: "stdout".into(),
                line: (*line).into(),
            })
            .collect();
        let watched = Watched {
            job: id,
            lines: logs
                .iter()
                .map(|l| SeenLine {
                    seq: l.seq,
                    stream: l.stream.clone(),
                    line: l.line.clone(),
                })
                .collect(),
            terminal: Some("succeeded".into()),
            ..Watched::default()
        };
        let snap = Snapshot {
            jobs: HashMap::from([(
                id,
                JobRow {
                    status: "succeeded".into(),
                    epoch: 2,
                },
            )]),
            attempts: HashMap::from([(
                id,
                BTreeMap::from([(1, "lost".to_owned()), (2, "succeeded".to_owned())]),
            )]),
            logs: HashMap::from([(id, logs)]),
        };
        (snap, HashMap::from([(id, Kind::Normal)]), vec![watched], id)
    }

    fn failing(snap: &Snapshot, kinds: &HashMap<Uuid, Kind>, watched: &[Watched]) -> Vec<String> {
        run_all(snap, kinds, LINES, watched, None)
            .into_iter()
            .filter(|c| !c.pass && !c.name.contains("stale write"))
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let (snap, kinds, watched, _) = clean();
        assert_eq!(failing(&snap, &kinds, &watched), Vec::<String>::new());
    }

    #[test]
    fn a_second_success_fails() {
        let (mut snap, kinds, watched, id) = clean();
        snap.attempts
            .get_mut(&id)
            .expect("the job's attempts")
            .insert(1, "succeeded".into());
        // Also flagged as incomplete output: the extra success ran one line.
        assert!(
            failing(&snap, &kinds, &watched).contains(
                &"no job completed twice; each success is the current epoch's".to_owned()
            )
        );
    }

    #[test]
    fn a_stale_line_after_a_newer_epoch_fails() {
        let (mut snap, kinds, watched, id) = clean();
        let logs = snap.logs.get_mut(&id).expect("the job's lines");
        logs.push(StoredLine {
            seq: 5,
            epoch: 1,
            stream: "stdout".into(),
            line: "line 2".into(),
        });
        assert!(
            failing(&snap, &kinds, &watched)
                .contains(&"log lines fenced by epoch, none stored twice".to_owned())
        );
    }

    #[test]
    fn a_line_stored_twice_in_one_attempt_fails() {
        let (mut snap, kinds, _, id) = clean();
        let logs = snap.logs.get_mut(&id).expect("the job's lines");
        logs.push(StoredLine {
            seq: 5,
            epoch: 2,
            stream: "stdout".into(),
            line: "line 3".into(),
        });
        assert!(
            failing(&snap, &kinds, &[])
                .contains(&"log lines fenced by epoch, none stored twice".to_owned())
        );
    }

    #[test]
    fn a_watcher_missing_or_repeating_a_line_fails() {
        let (snap, kinds, mut watched, _) = clean();
        watched[0].lines.remove(1);
        assert_eq!(
            failing(&snap, &kinds, &watched),
            ["watchers saw every line once, in order, then the terminal status"]
        );
        let (snap, kinds, mut watched, _) = clean();
        let again = watched[0].lines[3].clone();
        watched[0].lines.push(again);
        assert_eq!(
            failing(&snap, &kinds, &watched),
            ["watchers saw every line once, in order, then the terminal status"]
        );
    }

    #[test]
    fn an_unfinished_job_fails() {
        let (mut snap, kinds, mut watched, id) = clean();
        snap.jobs.get_mut(&id).expect("the job").status = "running".into();
        watched[0].terminal = None;
        let failed = failing(&snap, &kinds, &watched);
        assert!(failed.contains(&"every job reached a terminal state".to_owned()));
        assert!(
            failed.contains(
                &"no job completed twice; each success is the current epoch's".to_owned()
            )
        );
    }
}
