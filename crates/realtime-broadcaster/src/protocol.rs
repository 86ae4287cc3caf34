//! The WebSocket wire protocol: client and server messages, channel names
//! and close codes. `PROTOCOL.md` at the crate root is the reader's version;
//! keep the two in step.

use chrono::{DateTime, Utc};
use domain::events::LogLine;
use domain::job::JobStatus;
use domain::{JobId, OrgId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The subprotocol the server selects when a browser offers it (browsers
/// fail the handshake if they offer protocols and none is selected).
pub const SUBPROTOCOL: &str = "switchyard.v1";
/// A `Sec-WebSocket-Protocol` entry `bearer.<jwt>` carries the token.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// The largest client message accepted (client messages are a few hundred
/// bytes of JSON); a larger one closes the connection with 1009.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024;

/// A serialized server message: UTF-8 text, shared by every receiver.
pub type Frame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// Close codes, mapped once here.
pub mod close {
    /// The server is shutting down; reconnect (to any replica).
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame: the protocol is JSON text only.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A client message over [`super::MAX_CLIENT_MESSAGE_BYTES`].
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The verification keys are unavailable; retry later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// A frame that is not JSON.
    pub const PROTOCOL_ERROR: u16 = 4000;
    /// Missing, invalid or expired token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No pong to the server's ping within one interval.
    pub const KEEPALIVE_TIMEOUT: u16 = 4002;
    /// The per-connection send queue overflowed: resubscribe with `since_seq`.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// A channel a client may subscribe to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Job(JobId),
    Org(OrgId),
}

impl Topic {
    /// Parses `job:<uuid>` or `org:<id>`.
    pub fn parse(raw: &str) -> Option<Topic> {
        if let Some(id) = raw.strip_prefix("job:") {
            return Uuid::parse_str(id).ok().map(|u| Topic::Job(JobId(u)));
        }
        if let Some(id) = raw.strip_prefix("org:") {
            return OrgId::parse(id).ok().map(Topic::Org);
        }
        None
    }

    /// The client-facing name, which is also the bus channel's suffix.
    pub fn name(&self) -> String {
        match self {
            Topic::Job(id) => format!("job:{id}"),
            Topic::Org(id) => format!("org:{id}"),
        }
    }
}

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Subscribe {
        channel: String,
        /// The last sequence number the client has seen (0 or absent: all).
        #[serde(default)]
        since_seq: Option<i64>,
    },
    Unsubscribe {
        channel: String,
    },
    Ping {
        #[serde(default)]
        id: Option<serde_json::Value>,
    },
}

/// A job's status as the server reports it.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    pub channel: String,
    pub job_id: JobId,
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When this status was reached (or observed).
    pub at: DateTime<Utc>,
    /// The job is finished: on a job channel, every line has been sent
    /// before this message and the subscription ends.
    pub terminal: bool,
}

impl StatusView {
    pub fn from_row(channel: String, row: &db::jobs::Job) -> Self {
        let status = row.status();
        Self {
            channel,
            job_id: row.job_id(),
            status,
            attempt: Some((row.app_failures + row.infra_failures + 1).max(1) as u32),
            epoch: Some(row.lease_epoch.max(0) as u64),
            agent_id: row.agent_id,
            queue: Some(row.queue.clone()),
            created_at: Some(row.created_at),
            started_at: row.started_at,
            finished_at: row.finished_at,
            at: row.updated_at,
            terminal: status.is_terminal(),
        }
    }
}

/// What the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Subscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        since_seq: Option<i64>,
    },
    Log {
        channel: &'a str,
        job_id: JobId,
        lines: &'a [LogLine],
    },
    Status(StatusView),
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
}

impl ServerMessage<'_> {
    /// Serializes once; the frame is then shared by every receiver.
    pub fn frame(&self) -> Frame {
        match serde_json::to_string(self) {
            Ok(text) => Frame::from(text),
            // Only non-string map keys fail, and there are none.
            Err(error) => {
                tracing::error!(error = %error, "cannot encode a server message");
                Frame::from_static(
                    r#"{"type":"error","code":"internal","message":"encoding failed"}"#,
                )
            }
        }
    }
}

/// Error codes of `error` messages.
pub mod error_code {
    /// The message parsed as JSON but is not a valid client message.
    pub const BAD_REQUEST: &str = "bad_request";
    /// No such job or org among the token's orgs (another org's job looks
    /// exactly like a missing one).
    pub const NOT_FOUND: &str = "not_found";
    /// PostgreSQL or Redis did not answer; retry.
    pub const UNAVAILABLE: &str = "unavailable";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse_and_print() {
        let id = JobId::new();
        let topic = Topic::parse(&format!("job:{id}")).expect("job");
        assert_eq!(topic, Topic::Job(id));
        assert_eq!(topic.name(), format!("job:{id}"));
        assert!(Topic::parse("job:nope").is_none());
        assert!(Topic::parse("agent:x").is_none());
        assert_eq!(
            Topic::parse("org:acme").expect("org").name(),
            "org:acme".to_owned()
        );
    }

    #[test]
    fn client_messages_parse() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","channel":"org:a","since_seq":5}"#)
                .expect("parse");
        assert!(matches!(
            m,
            ClientMessage::Subscribe {
                since_seq: Some(5),
                ..
            }
        ));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"dance"}"#).is_err());
    }
}
