//! `yard jobs …`, `yard logs`, `yard queues …`, `yard agents …`,
//! `yard tokens create`: the everyday client tasks over job-api.

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use super::client::{ApiOptions, Client, cell, table};
use super::{Failure, print_line};

#[derive(clap::Subcommand)]
pub enum JobsCommand {
    /// Submit a job from flags or a JSON file (the API's request body).
    Submit(SubmitArgs),
    /// List jobs, newest first.
    List(ListArgs),
    /// Show one job: status, attempts, queue position, last log lines.
    Show { job: String },
    /// Cancel a job.
    Cancel { job: String },
    /// Run a finished job again.
    Retry { job: String },
    /// Approve a job waiting for approval.
    Approve { job: String },
    /// Reject a job waiting for approval.
    Reject { job: String },
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Shell command to run.
    #[arg(long)]
    pub command: Option<String>,
    /// Prompt for the agent's executor.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A JSON file with the job (flags given too override its fields).
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub priority: Option<i32>,
    /// Required agent label (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[arg(long)]
    pub repository: Option<String>,
    #[arg(long)]
    pub requires_approval: bool,
    /// Makes resubmitting safe: the same key returns the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    pub job: String,
    /// Keep following until the job finishes.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(clap::Subcommand)]
pub enum QueuesCommand {
    /// Every queue: depth, running, oldest wait, throughput.
    List,
    /// One queue's entries in dispatch order, with position and ETA.
    Show { queue: String },
}

#[derive(clap::Subcommand)]
pub enum AgentsCommand {
    /// The org's agents.
    List,
}

#[derive(clap::Subcommand)]
pub enum TokensCommand {
    /// Create a registration token for agents (shown once).
    Create {
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        #[arg(long, default_value_t = 3_600)]
        ttl_secs: u64,
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
}

fn emit(
    out: &mut dyn Write,
    client: &Client,
    value: &Value,
    human: impl FnOnce(&Value) -> String,
) -> Result<(), Failure> {
    if client.json {
        print_line(
            out,
            &serde_json::to_string_pretty(value).unwrap_or_default(),
        )
    } else {
        print_line(out, &human(value))
    }
}

fn job_line(job: &Value) -> Vec<String> {
    vec![
        cell(&job["id"]),
        cell(&job["status"]),
        cell(&job["queue"]),
        cell(&job["priority"]),
        cell(&job["attempt"]),
        cell(&job["created_at"]),
        job["command"]
            .as_str()
            .or(job["prompt"].as_str())
            .unwrap_or("-")
            .chars()
            .take(40)
            .collect(),
    ]
}

const JOB_HEADERS: [&str; 7] = [
    "ID", "STATUS", "QUEUE", "PRIORITY", "ATTEMPT", "CREATED", "WHAT",
];

pub fn run_jobs(
    command: JobsCommand,
    options: &ApiOptions,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let client = Client::new(options)?;
    match command {
        JobsCommand::Submit(args) => {
            let mut body = match &args.file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| Failure::usage(format!("reading {}: {e}", path.display())))?;
                    serde_json::from_str::<Value>(&text).map_err(|e| {
                        Failure::usage(format!("{} is not JSON: {e}", path.display()))
                    })?
                }
                None => json!({}),
            };
            let fields = [
                ("command", args.command.map(Value::from)),
                ("prompt", args.prompt.map(Value::from)),
                ("queue", args.queue.map(Value::from)),
                ("priority", args.priority.map(Value::from)),
                ("repository_id", args.repository.map(Value::from)),
                (
                    "labels",
                    (!args.labels.is_empty()).then(|| Value::from(args.labels.clone())),
                ),
                (
                    "requires_approval",
                    args.requires_approval.then_some(Value::Bool(true)),
                ),
            ];
            for (name, value) in fields {
                if let Some(value) = value {
                    body[name] = value;
                }
            }
            let headers: Vec<(&str, String)> = args
                .idempotency_key
                .map(|k| vec![("Idempotency-Key", k)])
                .unwrap_or_default();
            let job = client.post(&client.org_path("/jobs")?, Some(body), &headers)?;
            emit(out, &client, &job, |job| {
                format!("{} {}", cell(&job["id"]), cell(&job["status"]))
            })
        }
        JobsCommand::List(args) => {
            let mut query = vec![format!("limit={}", args.limit)];
            for (name, value) in [
                ("status", &args.status),
                ("queue", &args.queue),
                ("label", &args.label),
                ("cursor", &args.cursor),
            ] {
                if let Some(value) = value {
                    query.push(format!("{name}={value}"));
                }
            }
            let page = client.get(&format!(
                "{}?{}",
                client.org_path("/jobs")?,
                query.join("&")
            ))?;
            emit(out, &client, &page, |page| {
                let rows: Vec<Vec<String>> = page["items"]
                    .as_array()
                    .map(|i| i.iter().map(job_line).collect())
                    .unwrap_or_default();
                let mut text = table(&JOB_HEADERS, &rows);
                if let Some(next) = page["next_cursor"].as_str() {
                    text.push_str(&format!("\nmore: --cursor {next}"));
                }
                text
            })
        }
        JobsCommand::Show { job } => {
            let detail = client.get(&client.org_path(&format!("/jobs/{job}"))?)?;
            emit(out, &client, &detail, |d| {
                let mut lines = vec![
                    format!("job       {}", cell(&d["id"])),
                    format!("status    {}", cell(&d["status"])),
                    format!(
                        "queue     {} (priority {})",
                        cell(&d["queue"]),
                        cell(&d["priority"])
                    ),
                    format!(
                        "attempt   {} (epoch {})",
                        cell(&d["attempt"]),
                        cell(&d["epoch"])
                    ),
                ];
                if !d["queue_position"].is_null() {
                    lines.push(format!("position  {}", cell(&d["queue_position"])));
                }
                if !d["blocked_reason"].is_null() {
                    lines.push(format!(
                        "waiting   {}",
                        cell(&d["blocked_reason"]["reason"])
                    ));
                }
                for attempt in d["attempts"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "attempt {} on {}: {} (exit {})",
                        cell(&attempt["attempt"]),
                        cell(&attempt["agent_id"]),
                        cell(&attempt["outcome"]),
                        cell(&attempt["exit_code"])
                    ));
                }
                for line in d["log_tail"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "  {} | {}",
                        cell(&line["seq"]),
                        cell(&line["line"])
                    ));
                }
                lines.join("\n")
            })
        }
        JobsCommand::Cancel { job } => act(&client, out, &job, "cancel"),
        JobsCommand::Retry { job } => act(&client, out, &job, "retry"),
        JobsCommand::Approve { job } => act(&client, out, &job, "approve"),
        JobsCommand::Reject { job } => act(&client, out, &job, "reject"),
    }
}

fn act(client: &Client, out: &mut dyn Write, job: &str, verb: &str) -> Result<(), Failure> {
    let result = client.post(&client.org_path(&format!("/jobs/{job}/{verb}"))?, None, &[])?;
    emit(out, client, &result, |job| {
        format!("{} {}", cell(&job["id"]), cell(&job["status"]))
    })
}

const TERMINAL: [&str; 5] = ["succeeded", "failed", "cancelled", "timed_out", "dead"];

/// Prints the log; with `--follow`, keeps polling until the job finishes
/// and every line is printed.
pub fn run_logs(args: LogsArgs, options: &ApiOptions, out: &mut dyn Write) -> Result<(), Failure> {
    let client = Client::new(options)?;
    let mut after = 0i64;
    loop {
        let page = client.get(&client.org_path(&format!(
            "/jobs/{}/logs?after_seq={after}&limit=5000",
            args.job
        ))?)?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        for line in &lines {
            if client.json {
                print_line(out, &line.to_string())?;
            } else {
                print_line(out, line["line"].as_str().unwrap_or_default())?;
            }
        }
        after = page["next_after_seq"].as_i64().unwrap_or(after);
        if !lines.is_empty() {
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        let job = client.get(&client.org_path(&format!("/jobs/{}", args.job))?)?;
        let status = job["status"].as_str().unwrap_or_default();
        if TERMINAL.contains(&status) {
            // One last read: lines written just before the end.
            let last = client.get(&client.org_path(&format!(
                "/jobs/{}/logs?after_seq={after}&limit=5000",
                args.job
            ))?)?;
            for line in last["lines"].as_array().into_iter().flatten() {
                print_line(out, line["line"].as_str().unwrap_or_default())?;
            }
            return match status {
                "succeeded" => Ok(()),
                other => Err(Failure::runtime(format!("job ended {other}"))),
            };
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn run_queues(
    command: QueuesCommand,
    options: &ApiOptions,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let client = Client::new(options)?;
    match command {
        QueuesCommand::List => {
            let list = client.get(&client.org_path("/queues")?)?;
            emit(out, &client, &list, |l| {
                let rows: Vec<Vec<String>> = l["queues"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|q| {
                        [
                            "queue",
                            "queued",
                            "pending_approval",
                            "running",
                            "oldest_wait_secs",
                            "throughput_per_min",
                        ]
                        .iter()
                        .map(|k| cell(&q[*k]))
                        .collect()
                    })
                    .collect();
                table(
                    &[
                        "QUEUE",
                        "QUEUED",
                        "PENDING",
                        "RUNNING",
                        "OLDEST WAIT (S)",
                        "PER MIN",
                    ],
                    &rows,
                )
            })
        }
        QueuesCommand::Show { queue } => {
            let detail = client.get(&client.org_path(&format!("/queues/{queue}"))?)?;
            emit(out, &client, &detail, |d| {
                let rows: Vec<Vec<String>> = d["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        ["position", "job_id", "priority", "eta"]
                            .iter()
                            .map(|k| cell(&e[*k]))
                            .collect()
                    })
                    .collect();
                table(&["POSITION", "JOB", "PRIORITY", "ETA"], &rows)
            })
        }
    }
}

pub fn run_agents(
    command: AgentsCommand,
    options: &ApiOptions,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let client = Client::new(options)?;
    match command {
        AgentsCommand::List => {
            let list = client.get(&client.org_path("/agents")?)?;
            emit(out, &client, &list, |l| {
                let rows: Vec<Vec<String>> = l["agents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        [
                            "id",
                            "name",
                            "status",
                            "labels",
                            "capacity",
                            "running_jobs",
                            "success_rate",
                            "last_seen_at",
                        ]
                        .iter()
                        .map(|k| cell(&a[*k]))
                        .collect()
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "NAME",
                        "STATUS",
                        "LABELS",
                        "CAPACITY",
                        "RUNNING",
                        "SUCCESS",
                        "LAST SEEN",
                    ],
                    &rows,
                )
            })
        }
    }
}

pub fn run_tokens(
    command: TokensCommand,
    options: &ApiOptions,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let client = Client::new(options)?;
    match command {
        TokensCommand::Create {
            max_uses,
            ttl_secs,
            labels,
            description,
        } => {
            let body = json!({"max_uses": max_uses, "ttl_secs": ttl_secs, "labels": labels, "description": description});
            let created =
                client.post(&client.org_path("/registration-tokens")?, Some(body), &[])?;
            emit(out, &client, &created, |c| cell(&c["token"]))
        }
    }
}
