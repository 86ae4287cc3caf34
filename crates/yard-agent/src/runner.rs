//! Runs one job's process: its `command` through the shell, or its
//! `prompt` through the executor template, in a working directory of its
//! own, in a process group of its own (so a cancel reaches every process
//! it started). Output lines and the exit are reported as [`JobEvent`]s.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Lines longer than this are cut (and end with a newline).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    System,
}

/// What a job needs to run.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub job_id: String,
    pub epoch: u64,
    pub attempt: u32,
    pub command: Option<String>,
    pub prompt: Option<String>,
    pub metadata_json: String,
}

/// How the process ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    pub code: Option<i32>,
    /// Set when the process could not be started at all.
    pub error: Option<String>,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.error.is_none() && self.code == Some(0)
    }
}

#[derive(Debug)]
pub enum JobEvent {
    Output {
        job_id: String,
        epoch: u64,
        stream: Stream,
        line: Vec<u8>,
    },
    Exited {
        job_id: String,
        epoch: u64,
        exit: Exit,
    },
}

/// Orders for a running job.
#[derive(Debug)]
pub enum Control {
    /// SIGTERM now, SIGKILL after the grace period.
    Cancel { grace: Duration },
    /// SIGKILL now (the job is stale).
    Kill,
}

/// Where and how jobs run.
#[derive(Clone, Debug)]
pub struct Runner {
    pub work_dir: PathBuf,
    pub shell: String,
    pub executor: Option<String>,
}

/// Quotes `value` for a POSIX shell.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

impl Runner {
    /// The shell command line for a job, or why there is none.
    pub fn command_line(
        &self,
        spec: &JobSpec,
        dir: &Path,
        prompt_file: Option<&Path>,
    ) -> Result<String, String> {
        if let Some(command) = spec.command.as_deref().filter(|c| !c.trim().is_empty()) {
            return Ok(command.to_owned());
        }
        let (Some(prompt), Some(prompt_file)) = (spec.prompt.as_deref(), prompt_file) else {
            return Err("the job has neither a command nor a prompt".to_owned());
        };
        let template = self.executor.as_deref().ok_or_else(|| {
            "the job has a prompt but this agent has no executor (set SWITCHYARD_EXECUTOR)"
                .to_owned()
        })?;
        Ok(template
            .replace(
                "{prompt_file}",
                &shell_quote(&prompt_file.to_string_lossy()),
            )
            .replace("{prompt}", &shell_quote(prompt))
            .replace("{job_id}", &shell_quote(&spec.job_id))
            .replace("{work_dir}", &shell_quote(&dir.to_string_lossy())))
    }

    /// Runs the job to its end, obeying `control`; always reports `Exited`.
    pub async fn run(
        self,
        spec: JobSpec,
        events: mpsc::UnboundedSender<JobEvent>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let exit = self.run_inner(&spec, &events, &mut control).await;
        let _ = events.send(JobEvent::Exited {
            job_id: spec.job_id.clone(),
            epoch: spec.epoch,
            exit,
        });
    }

    async fn run_inner(
        &self,
        spec: &JobSpec,
        events: &mpsc::UnboundedSender<JobEvent>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Exit {
        let failed = |error: String| Exit {
            code: None,
            error: Some(error),
        };
        let dir = self.work_dir.join(&spec.job_id);
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return failed(format!("cannot create {}: {e}", dir.display()));
        }
        let prompt_file = match &spec.prompt {
            Some(prompt) => {
                let path = dir.join("prompt.md");
                if let Err(e) = tokio::fs::write(&path, prompt).await {
                    return failed(format!("cannot write {}: {e}", path.display()));
                }
                Some(path)
            }
            None => None,
        };
        let line = match self.command_line(spec, &dir, prompt_file.as_deref()) {
            Ok(line) => line,
            Err(e) => return failed(e),
        };
        let mut command = Command::new(&self.shell);
        command
            .arg("-c")
            .arg(&line)
            .current_dir(&dir)
            .env("SWITCHYARD_JOB_ID", &spec.job_id)
            .env("SWITCHYARD_JOB_EPOCH", spec.epoch.to_string())
            .env("SWITCHYARD_JOB_ATTEMPT", spec.attempt.to_string())
            .env("SWITCHYARD_JOB_METADATA", &spec.metadata_json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(path) = &prompt_file {
            command.env("SWITCHYARD_PROMPT_FILE", path);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => return failed(format!("cannot start {}: {e}", self.shell)),
        };
        let pid = child.id();
        let readers = [
            child.stdout.take().map(|out| {
                tokio::spawn(forward(
                    out,
                    spec.job_id.clone(),
                    spec.epoch,
                    Stream::Stdout,
                    events.clone(),
                ))
            }),
            child.stderr.take().map(|err| {
                tokio::spawn(forward(
                    err,
                    spec.job_id.clone(),
                    spec.epoch,
                    Stream::Stderr,
                    events.clone(),
                ))
            }),
        ];
        let mut kill_at: Option<tokio::time::Instant> = None;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                order = control.recv() => match order {
                    Some(Control::Cancel { grace }) => {
                        if kill_at.is_none() {
                            signal_group(pid, "TERM");
                            kill_at = Some(tokio::time::Instant::now() + grace);
                        }
                    }
                    Some(Control::Kill) | None => {
                        signal_group(pid, "KILL");
                        kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                    }
                },
                () = async {
                    match kill_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    signal_group(pid, "KILL");
                    kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
            }
        };
        // Whatever the shell left behind in its group goes with it.
        if kill_at.is_some() {
            signal_group(pid, "KILL");
        }
        for reader in readers.into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
        match status {
            Ok(status) => Exit {
                code: status.code().or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    status.signal().map(|s| 128 + s)
                }),
                error: None,
            },
            Err(e) => failed(format!("waiting for the process failed: {e}")),
        }
    }
}

/// Sends a signal to the process group led by `pid` (via `kill(1)`: this
/// workspace forbids `unsafe`, so no direct `kill(2)`).
fn signal_group(pid: Option<u32>, signal: &str) {
    let Some(pid) = pid else { return };
    let result = std::process::Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = result {
        tracing::warn!(pid, signal, error = %e, "cannot signal the job's processes");
    }
}

async fn forward(
    pipe: impl AsyncRead + Unpin,
    job_id: String,
    epoch: u64,
    stream: Stream,
    events: mpsc::UnboundedSender<JobEvent>,
) {
    let mut reader = BufReader::new(pipe);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                // Offsets count the bytes as sent, so make them valid UTF-8
                // first: both transports then carry identical bytes.
                let mut line = String::from_utf8_lossy(&raw).into_owned().into_bytes();
                if line.len() > MAX_LINE_BYTES {
                    line.truncate(MAX_LINE_BYTES - 1);
                    while String::from_utf8(line.clone()).is_err() {
                        line.pop();
                    }
                    line.push(b'\n');
                }
                if events
                    .send(JobEvent::Output {
                        job_id: job_id.clone(),
                        epoch,
                        stream,
                        line,
                    })
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: Option<&str>, prompt: Option<&str>) -> JobSpec {
        JobSpec {
            job_id: "j1".into(),
            epoch: 1,
            attempt: 1,
            command: command.map(Into::into),
            prompt: prompt.map(Into::into),
            metadata_json: "{}".into(),
        }
    }

    #[test]
    fn prompts_go_through_the_executor_template_quoted() {
        let runner = Runner {
            work_dir: "/w".into(),
            shell: "/bin/sh".into(),
            executor: Some("claude -p {prompt} --file {prompt_file}".into()),
        };
        let line = runner
            .command_line(
                &spec(None, Some("it's")),
                Path::new("/w/j1"),
                Some(Path::new("/w/j1/prompt.md")),
            )
            .expect("line");
        assert_eq!(line, r"claude -p 'it'\''s' --file '/w/j1/prompt.md'");
        let line = runner
            .command_line(
                &spec(Some("echo hi"), Some("p")),
                Path::new("/w"),
                Some(Path::new("/p")),
            )
            .expect("line");
        assert_eq!(line, "echo hi");
        let no_executor = Runner {
            executor: None,
            ..runner
        };
        assert!(
            no_executor
                .command_line(
                    &spec(None, Some("p")),
                    Path::new("/w"),
                    Some(Path::new("/p"))
                )
                .is_err()
        );
    }
}
