//! Events published on the bus after a change commits. They are hints and
//! live fan-out only: PostgreSQL holds the truth, so a consumer that misses
//! one recovers by reading the database.
//!
//! Every event travels in an [`Envelope`] that carries a schema version, the
//! organization (for authorization at the edge), the request id and the W3C
//! trace context of the request that caused it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::AgentStatus;
use crate::ids::{AgentId, JobId, OrgId};
use crate::job::{JobStatus, QueueName};

/// Current envelope schema version. Consumers skip envelopes with a newer
/// major version than they understand.
pub const ENVELOPE_VERSION: u16 = 1;

/// W3C trace context (`traceparent`, `tracestate`) of the causing request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub id: Uuid,
    pub org_id: OrgId,
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    pub event: Event,
}

impl Envelope {
    pub fn new(org_id: OrgId, event: Event) -> Self {
        Self {
            version: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            org_id,
            occurred_at: Utc::now(),
            request_id: None,
            trace: None,
            event,
        }
    }

    pub fn with_request_id(mut self, request_id: Option<String>) -> Self {
        self.request_id = request_id;
        self
    }

    pub fn with_trace(mut self, trace: Option<TraceContext>) -> Self {
        self.trace = trace;
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines the agent itself writes (setup, cancellation notices).
    System,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            "system" => Some(LogStream::System),
            _ => None,
        }
    }
}

/// One stored log line. `seq` is gapless per job, starting at 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: i64,
    pub stream: LogStream,
    pub at: DateTime<Utc>,
    pub line: String,
}

/// One lease of an [`Event::AssignmentsOffered`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub job_id: JobId,
    pub epoch: u64,
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
    /// The trace this offer continues (the job's own, through the
    /// scheduler's offer span); the envelope's trace is the dispatch's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<OfferedJob>,
}

/// What an agent needs to run an offered job, as the lease statement
/// returned it. Carried in the offer when small, so the gateway hands the
/// assignment over without reading the job back; an offer without it is
/// read from PostgreSQL. The agent's acknowledgement is fenced by the
/// epoch either way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferedJob {
    pub queue: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<DateTime<Utc>>,
}

impl OfferedJob {
    /// Offers carry jobs up to this size (payload and metadata as JSON);
    /// larger ones are read by the gateway, keeping bus messages small.
    pub const MAX_CARRIED_BYTES: usize = 4 * 1024;
}

/// One job's new status in an [`Event::JobStatusesChanged`]: the fields of
/// an [`Event::JobStatusChanged`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatusChange {
    pub job_id: JobId,
    pub status: JobStatus,
    pub attempt: u32,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
}

impl JobStatusChange {
    /// The single-job event announcing this change.
    pub fn event(&self) -> Event {
        Event::JobStatusChanged {
            job_id: self.job_id,
            status: self.status,
            attempt: self.attempt,
            epoch: self.epoch,
            agent_id: self.agent_id,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    JobCreated {
        job_id: JobId,
        queue: QueueName,
        status: JobStatus,
    },
    JobStatusChanged {
        job_id: JobId,
        status: JobStatus,
        attempt: u32,
        epoch: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_id: Option<AgentId>,
    },
    /// Several jobs' new statuses from one write (a dispatch, a gateway's
    /// batch of acknowledgements or successes), in one message on the org's
    /// channel instead of one each; each job's own channel still gets its
    /// [`Event::JobStatusChanged`].
    JobStatusesChanged { changes: Vec<JobStatusChange> },
    /// Lines `first_seq ..= first_seq + lines.len() - 1`, in order.
    LogLinesAppended {
        job_id: JobId,
        epoch: u64,
        lines: Vec<LogLine>,
    },
    AgentStatusChanged {
        agent_id: AgentId,
        status: AgentStatus,
    },
    /// The order or content of a queue changed (enqueue, reorder, approval).
    QueueChanged { queue: QueueName },

    // Commands for one agent, published on its `agent:<id>` channel and
    // delivered by whichever gateway replica holds its session. A command
    // lost on the way is repaired from PostgreSQL: an assignment never
    // acknowledged lapses and is requeued without spending an attempt; a
    // cancel is re-sent by the scheduler's sweep and piggybacked on every
    // heartbeat reply.
    /// The scheduler leased a job to the agent: deliver the assignment.
    AssignmentOffered {
        agent_id: AgentId,
        job_id: JobId,
        epoch: u64,
        attempt: u32,
        lease_expires_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<OfferedJob>,
    },
    /// Several leases to one agent from one dispatch, in one message instead
    /// of one each: deliver every assignment.
    AssignmentsOffered {
        agent_id: AgentId,
        offers: Vec<Offer>,
    },
    /// Stop the job running at `epoch`; after `grace_ms` the cancel is forced.
    CancelRequested {
        agent_id: AgentId,
        job_id: JobId,
        epoch: u64,
        grace_ms: u64,
    },
    /// Take no new work (finish what is running).
    DrainRequested { agent_id: AgentId },
    /// The agent's credential was revoked: end its session now.
    AgentRevoked { agent_id: AgentId },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::JobCreated { .. } => "job_created",
            Event::JobStatusChanged { .. } => "job_status_changed",
            Event::JobStatusesChanged { .. } => "job_statuses_changed",
            Event::LogLinesAppended { .. } => "log_lines_appended",
            Event::AgentStatusChanged { .. } => "agent_status_changed",
            Event::QueueChanged { .. } => "queue_changed",
            Event::AssignmentOffered { .. } => "assignment_offered",
            Event::AssignmentsOffered { .. } => "assignments_offered",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::DrainRequested { .. } => "drain_requested",
            Event::AgentRevoked { .. } => "agent_revoked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_json() {
        let org = OrgId::parse("acme").expect("org");
        let envelope = Envelope::new(
            org,
            Event::LogLinesAppended {
                job_id: JobId::new(),
                epoch: 3,
                lines: vec![LogLine {
                    seq: 1,
                    stream: LogStream::Stderr,
                    at: Utc::now(),
                    line: "boom".into(),
                }],
            },
        )
        .with_request_id(Some("req-1".into()))
        .with_trace(Some(TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: None,
        }));
        let json = serde_json::to_string(&envelope).expect("serialize");
        assert!(json.contains("\"type\":\"log_lines_appended\""));
        assert!(json.contains("\"version\":1"));
        let back: Envelope = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, envelope);
    }

    #[test]
    fn unknown_event_types_fail_to_parse() {
        let json = r#"{"version":1,"id":"0190c6d4-0000-7000-8000-000000000000","org_id":"a","occurred_at":"2026-01-01T00:00:00Z","event":{"type":"mystery"}}"#;
        assert!(serde_json::from_str::<Envelope>(json).is_err());
    }
}
