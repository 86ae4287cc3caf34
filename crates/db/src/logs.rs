//! Job logs: lines stored with a gapless per-job sequence, appended in
//! batches, fenced by the lease epoch, and idempotent by byte offset so an
//! agent may resend a chunk (after a reconnect, or on another transport)
//! without duplicating lines.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use domain::events::{LogLine, LogStream};
use domain::{DomainError, JobId};

use crate::cached::CacheStatement;
use crate::schema::{job_log_heads, job_logs, jobs};
use crate::{DbError, DbResult, PgConn};

/// One line as the agent sent it, with the byte offset just past its end
/// in the attempt's output.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingLine {
    pub stream: LogStream,
    pub at: DateTime<Utc>,
    pub line: String,
    pub end_offset: u64,
}

/// The result of an append.
#[derive(Clone, Debug, PartialEq)]
pub struct Appended {
    /// Lines newly stored (empty if the chunk was a pure resend).
    pub lines: Vec<LogLine>,
    /// Bytes of this attempt's output now stored: where to resume.
    pub committed_offset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("log chunk starts at byte {given} but {committed} bytes are committed")]
pub struct OffsetGap {
    pub given: u64,
    pub committed: u64,
}

/// Appends lines starting at byte `start_offset` of the attempt at `epoch`.
/// Lines already committed (a resend) are skipped; a chunk that starts past
/// the committed offset would leave a gap, and one whose line straddles it
/// would store a partial duplicate: both are refused with the offset to
/// resume from.
pub async fn append(
    conn: &mut PgConn,
    job: JobId,
    epoch: u64,
    start_offset: u64,
    lines: &[IncomingLine],
) -> DbResult<Result<Appended, OffsetGap>> {
    // Three round trips: BEGIN, the job's read and the head's creation and
    // read in one pipeline, the lines and the head's update in another, then
    // COMMIT (a chunk took seven, and a job's chunks are stored in turn).
    // Statements in a pipeline run in the order sent.
    conn.pipelined_transaction(async {
        let shared = conn.pipeline();
        let (mut for_job, mut for_insert, mut for_head) = (shared, shared, shared);
        // FOR SHARE: a concurrent re-lease (epoch bump) waits for this
        // append to commit, so no stale line lands after the new lease; and
        // the job cannot be deleted under its lines (job_logs has no
        // foreign key: this read is its check).
        let current = jobs::table
            .find(job.as_uuid())
            .select((jobs::lease_epoch, jobs::status))
            .for_share()
            .first::<(i64, String)>(&mut for_job);
        // The head is made by a job's first append, only for a job that exists.
        let create_head = diesel::sql_query(
            "INSERT INTO job_log_heads (job_id, epoch) \
             SELECT id, $2 FROM jobs WHERE id = $1 ON CONFLICT DO NOTHING",
        )
        .bind::<SqlUuid, _>(job.as_uuid())
        .bind::<BigInt, _>(epoch as i64)
        .cached()
        .execute(&mut for_insert);
        let head = job_log_heads::table
            .find(job.as_uuid())
            .select((
                job_log_heads::next_seq,
                job_log_heads::epoch,
                job_log_heads::committed_offset,
            ))
            .for_update()
            .first::<(i64, i64, i64)>(&mut for_head);
        let (current, _, head) =
            futures_util::try_join!(async { current.await.optional() }, create_head, async {
                head.await.optional()
            })?;
        let (Some((current_epoch, status)), Some((next_seq, head_epoch, committed))) =
            (current, head)
        else {
            return Err(DbError::NotFound);
        };
        if current_epoch as u64 != epoch {
            return Err(DomainError::StaleEpoch {
                given: epoch,
                current: current_epoch as u64,
            }
            .into());
        }
        let status: domain::job::JobStatus = status.parse().map_err(DomainError::from)?;
        if !status.holds_lease() {
            return Err(DomainError::InvalidTransition {
                from: status,
                action: "accept log lines",
            }
            .into());
        }
        // Byte offsets count within one attempt; a new epoch starts at 0.
        let committed = if head_epoch == epoch as i64 {
            committed as u64
        } else {
            0
        };
        if start_offset > committed {
            return Ok(Err(OffsetGap {
                given: start_offset,
                committed,
            }));
        }
        // A line that straddles the committed offset would be stored twice
        // (once in part): the agent must resend from a line boundary.
        let mut line_start = start_offset;
        for line in lines {
            if line_start < committed && line.end_offset > committed {
                return Ok(Err(OffsetGap {
                    given: line_start,
                    committed,
                }));
            }
            line_start = line.end_offset;
        }
        let fresh: Vec<&IncomingLine> = lines.iter().filter(|l| l.end_offset > committed).collect();
        let new_committed = fresh.last().map_or(committed, |l| l.end_offset);
        let stored: Vec<LogLine> = fresh
            .iter()
            .enumerate()
            .map(|(i, l)| LogLine {
                seq: next_seq + i as i64,
                stream: l.stream,
                at: l.at,
                line: l.line.clone(),
            })
            .collect();
        let (mut for_lines, mut for_update) = (shared, shared);
        let insert_lines = async {
            if stored.is_empty() {
                return Ok(0);
            }
            diesel::sql_query(
                "INSERT INTO job_logs (job_id, seq, epoch, stream, at, line) \
                 SELECT $1, s.seq, $2, s.stream, s.at, s.line \
                 FROM unnest($3::int8[], $4::text[], $5::timestamptz[], $6::text[]) \
                   AS s(seq, stream, at, line)",
            )
            .bind::<SqlUuid, _>(job.as_uuid())
            .bind::<BigInt, _>(epoch as i64)
            .bind::<Array<BigInt>, _>(stored.iter().map(|l| l.seq).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(stored.iter().map(|l| l.stream.as_str()).collect::<Vec<_>>())
            .bind::<Array<Timestamptz>, _>(stored.iter().map(|l| l.at).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(stored.iter().map(|l| l.line.as_str()).collect::<Vec<_>>())
            .cached()
            .execute(&mut for_lines)
            .await
        };
        let update_head = diesel::update(job_log_heads::table.find(job.as_uuid()))
            .set((
                job_log_heads::next_seq.eq(next_seq + stored.len() as i64),
                job_log_heads::epoch.eq(epoch as i64),
                job_log_heads::committed_offset.eq(new_committed as i64),
            ))
            .execute(&mut for_update);
        futures_util::try_join!(insert_lines, update_head)?;
        Ok(Ok(Appended {
            lines: stored,
            committed_offset: new_committed,
        }))
    })
    .await
}

#[derive(Queryable)]
struct LineRow {
    seq: i64,
    stream: String,
    at: DateTime<Utc>,
    line: String,
}

/// Lines with `seq > after_seq`, in order, at most `limit`.
pub async fn read(
    conn: &mut PgConn,
    job: JobId,
    after_seq: i64,
    limit: u32,
) -> DbResult<Vec<LogLine>> {
    let rows: Vec<LineRow> = job_logs::table
        .filter(job_logs::job_id.eq(job.as_uuid()))
        .filter(job_logs::seq.gt(after_seq))
        .order(job_logs::seq.asc())
        .limit(i64::from(limit))
        .select((
            job_logs::seq,
            job_logs::stream,
            job_logs::at,
            job_logs::line,
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| LogLine {
            seq: r.seq,
            stream: LogStream::parse(&r.stream).unwrap_or(LogStream::System),
            at: r.at,
            line: r.line,
        })
        .collect())
}

/// The last `count` lines, oldest first.
pub async fn tail(conn: &mut PgConn, job: JobId, count: u32) -> DbResult<Vec<LogLine>> {
    let last_seq: Option<i64> = job_log_heads::table
        .find(job.as_uuid())
        .select(job_log_heads::next_seq)
        .first(conn)
        .await
        .optional()?;
    let after = last_seq.map_or(0, |next| (next - 1 - i64::from(count)).max(0));
    read(conn, job, after, count).await
}
