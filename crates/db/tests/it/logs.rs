//! Job logs: a gapless per-job sequence, idempotent resends by byte offset,
//! epoch fencing, and paging.

use std::time::Duration;

use chrono::Utc;
use db::DbError;
use db::leases::Ending;
use db::logs::{IncomingLine, OffsetGap};
use domain::events::LogStream;
use domain::job::JobStatus;
use domain::{AgentId, DomainError, JobId};
use test_support::TestDb;

use crate::support::{self, acme, create_one, job, lease_and_start};

/// Lines as an agent would send them from byte `start`: each line's end
/// offset counts its text and a newline.
fn chunk(start: u64, texts: &[&str]) -> Vec<IncomingLine> {
    let mut offset = start;
    texts
        .iter()
        .map(|text| {
            offset += text.len() as u64 + 1;
            IncomingLine {
                stream: LogStream::Stdout,
                at: Utc::now(),
                line: (*text).to_owned(),
                end_offset: offset,
            }
        })
        .collect()
}

fn end_of(lines: &[IncomingLine]) -> u64 {
    lines.last().expect("lines").end_offset
}

/// A running job of `acme` and its epoch.
async fn running_job(conn: &mut db::PgConn) -> (JobId, u64) {
    let org = acme(conn).await;
    let id = create_one(conn, &org, job("build")).await.job_id();
    let lease = lease_and_start(conn, id, AgentId::new()).await;
    (id, lease.epoch as u64)
}

async fn stored_lines(conn: &mut db::PgConn, job: JobId) -> Vec<(i64, String)> {
    db::logs::read(conn, job, 0, 10_000)
        .await
        .expect("read")
        .into_iter()
        .map(|l| (l.seq, l.line))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn appended_lines_get_a_gapless_sequence_starting_at_one() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (id, epoch) = running_job(&mut conn).await;
    let first = chunk(0, &["one", "two", "three"]);
    let second = chunk(end_of(&first), &["four", "five"]);

    let a = db::logs::append(&mut conn, id, epoch, 0, &first)
        .await
        .expect("append")
        .expect("no gap");
    let b = db::logs::append(&mut conn, id, epoch, end_of(&first), &second)
        .await
        .expect("append")
        .expect("no gap");

    assert_eq!(a.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(b.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(a.committed_offset, end_of(&first));
    assert_eq!(b.committed_offset, end_of(&second));
    assert_eq!(b.lines[0].line, "four");
    assert_eq!(b.lines[0].stream, LogStream::Stdout);
    let stored = stored_lines(&mut conn, id).await;
    assert_eq!(
        stored,
        [
            (1, "one"),
            (2, "two"),
            (3, "three"),
            (4, "four"),
            (5, "five")
        ]
        .map(|(s, l)| (s, l.to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resending_a_committed_chunk_stores_nothing_and_returns_the_same_offset() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (id, epoch) = running_job(&mut conn).await;
    let lines = chunk(0, &["one", "two", "three"]);
    let first = db::logs::append(&mut conn, id, epoch, 0, &lines)
        .await
        .expect("append")
        .expect("no gap");

    let resent = db::logs::append(&mut conn, id, epoch, 0, &lines)
        .await
        .expect("resend")
        .expect("no gap");

    assert!(resent.lines.is_empty());
    assert_eq!(resent.committed_offset, first.committed_offset);
    assert_eq!(stored_lines(&mut conn, id).await.len(), 3);

    // A resend that overlaps the committed bytes stores only the new lines.
    let overlapping = chunk(0, &["one", "two", "three", "four"]);
    let extended = db::logs::append(&mut conn, id, epoch, 0, &overlapping)
        .await
        .expect("overlap")
        .expect("no gap");
    assert_eq!(extended.lines.len(), 1);
    assert_eq!(
        (extended.lines[0].seq, extended.lines[0].line.as_str()),
        (4, "four")
    );
    assert_eq!(extended.committed_offset, end_of(&overlapping));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_past_the_committed_offset_is_refused_with_the_resume_point() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (id, epoch) = running_job(&mut conn).await;
    let first = chunk(0, &["one"]);
    db::logs::append(&mut conn, id, epoch, 0, &first)
        .await
        .expect("append")
        .expect("no gap");
    let committed = end_of(&first);

    let gap = db::logs::append(
        &mut conn,
        id,
        epoch,
        committed + 10,
        &chunk(committed + 10, &["lost?"]),
    )
    .await
    .expect("append");

    assert_eq!(
        gap,
        Err(OffsetGap {
            given: committed + 10,
            committed
        })
    );
    assert_eq!(stored_lines(&mut conn, id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_epoch_cannot_append_lines() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let id = create_one(&mut conn, &org, job("build")).await.job_id();
    let old = lease_and_start(&mut conn, id, AgentId::new()).await;
    db::leases::end_attempt(
        &mut conn,
        id,
        Some(old.epoch as u64),
        Ending::Released {
            delay: Duration::ZERO,
        },
    )
    .await
    .expect("release");
    lease_and_start(&mut conn, id, AgentId::new()).await;

    let stale = db::logs::append(&mut conn, id, old.epoch as u64, 0, &chunk(0, &["late"])).await;

    assert!(
        matches!(
            stale,
            Err(DbError::Domain(DomainError::StaleEpoch {
                given: 1,
                current: 2
            }))
        ),
        "got {stale:?}"
    );
    assert!(stored_lines(&mut conn, id).await.is_empty());
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM job_log_heads").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_without_a_lease_cannot_append_lines() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let queued = create_one(&mut conn, &org, job("build")).await.job_id();
    let (finished, epoch) = running_job(&mut conn).await;
    db::leases::succeed(&mut conn, finished, epoch, Some(0))
        .await
        .expect("succeed");

    let before_lease = db::logs::append(&mut conn, queued, 0, 0, &chunk(0, &["x"])).await;
    let after_end = db::logs::append(&mut conn, finished, epoch, 0, &chunk(0, &["x"])).await;
    let unknown = db::logs::append(&mut conn, JobId::new(), 1, 0, &chunk(0, &["x"])).await;

    assert!(
        matches!(
            before_lease,
            Err(DbError::Domain(DomainError::InvalidTransition {
                from: JobStatus::Queued,
                ..
            }))
        ),
        "got {before_lease:?}"
    );
    assert!(
        matches!(
            after_end,
            Err(DbError::Domain(DomainError::InvalidTransition {
                from: JobStatus::Succeeded,
                ..
            }))
        ),
        "got {after_end:?}"
    );
    assert!(matches!(unknown, Err(DbError::NotFound)), "got {unknown:?}");
    assert_eq!(
        support::count(&mut conn, "SELECT count(*) AS count FROM job_logs").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_lease_restarts_byte_offsets_but_continues_the_sequence() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let mut new = job("build");
    new.retry_policy = support::no_backoff(3);
    let id = create_one(&mut conn, &org, new).await.job_id();
    let first = lease_and_start(&mut conn, id, AgentId::new()).await;
    let first_lines = chunk(0, &["attempt one", "it failed"]);
    db::logs::append(&mut conn, id, first.epoch as u64, 0, &first_lines)
        .await
        .expect("append")
        .expect("no gap");
    db::leases::end_attempt(
        &mut conn,
        id,
        Some(first.epoch as u64),
        Ending::Failed {
            exit_code: Some(1),
            error_kind: None,
            message: None,
        },
    )
    .await
    .expect("fail");
    let second = lease_and_start(&mut conn, id, AgentId::new()).await;
    let second_lines = chunk(0, &["attempt two"]);

    let appended = db::logs::append(&mut conn, id, second.epoch as u64, 0, &second_lines)
        .await
        .expect("append")
        .expect("offsets restart at 0");

    assert_eq!(
        appended.lines.len(),
        1,
        "a line at an offset the last attempt used is new"
    );
    assert_eq!(appended.lines[0].seq, 3);
    assert_eq!(appended.committed_offset, end_of(&second_lines));
    let epochs: Vec<i64> = {
        use db::schema::job_logs;
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        job_logs::table
            .filter(job_logs::job_id.eq(id.as_uuid()))
            .order(job_logs::seq.asc())
            .select(job_logs::epoch)
            .load(&mut conn)
            .await
            .expect("epochs")
    };
    assert_eq!(epochs, [1, 1, 2]);
    // The first attempt's offsets no longer count: a chunk from its end is a gap.
    let resumed = db::logs::append(
        &mut conn,
        id,
        second.epoch as u64,
        end_of(&first_lines),
        &chunk(end_of(&first_lines), &["x"]),
    )
    .await
    .expect("append");
    assert_eq!(
        resumed,
        Err(OffsetGap {
            given: end_of(&first_lines),
            committed: end_of(&second_lines)
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_returns_the_last_lines_oldest_first_and_read_pages_forward() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (id, epoch) = running_job(&mut conn).await;
    let texts: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    db::logs::append(&mut conn, id, epoch, 0, &chunk(0, &texts))
        .await
        .expect("append")
        .expect("no gap");
    let seqs =
        |lines: Vec<domain::events::LogLine>| lines.into_iter().map(|l| l.seq).collect::<Vec<_>>();

    assert_eq!(
        seqs(db::logs::tail(&mut conn, id, 3).await.expect("tail")),
        [8, 9, 10]
    );
    assert_eq!(
        seqs(db::logs::tail(&mut conn, id, 20).await.expect("tail")),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(db::logs::read(&mut conn, id, 0, 4).await.expect("read")),
        [1, 2, 3, 4]
    );
    assert_eq!(
        seqs(db::logs::read(&mut conn, id, 4, 4).await.expect("read")),
        [5, 6, 7, 8]
    );
    assert_eq!(
        seqs(db::logs::read(&mut conn, id, 8, 4).await.expect("read")),
        [9, 10]
    );
    assert!(
        db::logs::read(&mut conn, id, 10, 4)
            .await
            .expect("read")
            .is_empty()
    );
    let last = db::logs::tail(&mut conn, id, 1).await.expect("tail");
    assert_eq!(last[0].line, "line 10");
    assert!(
        db::logs::tail(&mut conn, JobId::new(), 5)
            .await
            .expect("tail")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_appends_to_one_job_keep_the_sequence_gapless() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (id, epoch) = running_job(&mut conn).await;
    let pool = support::pool(&test_db, 2);

    let mut writers = Vec::new();
    for writer in 0..2 {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            let mut committed = 0;
            let mut stored = Vec::new();
            for batch in 0..40 {
                // Every line has the same length, so whatever the other writer committed
                // ends on a line boundary of this chunk too: with lengths that differ, the
                // committed offset can fall mid-line, which append rightly refuses.
                let texts: Vec<String> = (0..3)
                    .map(|i| format!("w{writer} b{batch:02} l{i}"))
                    .collect();
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                let appended =
                    db::logs::append(&mut conn, id, epoch, committed, &chunk(committed, &texts))
                        .await
                        .expect("append")
                        .expect("starting at a committed offset is never a gap");
                committed = appended.committed_offset;
                stored.extend(appended.lines.into_iter().map(|l| l.seq));
            }
            stored
        }));
    }
    let mut reported: Vec<i64> = futures_util::future::join_all(writers)
        .await
        .into_iter()
        .flat_map(|r| r.expect("writer"))
        .collect();
    reported.sort_unstable();

    let total = support::count(&mut conn, "SELECT count(*) AS count FROM job_logs").await;
    let max_seq = support::count(
        &mut conn,
        "SELECT coalesce(max(seq), 0) AS count FROM job_logs",
    )
    .await;
    let min_seq = support::count(
        &mut conn,
        "SELECT coalesce(min(seq), 0) AS count FROM job_logs",
    )
    .await;
    assert!(
        total >= 3,
        "at least the first chunk was stored ({total} lines)"
    );
    assert_eq!(max_seq, total, "max(seq) = count(*): no gaps");
    assert_eq!(min_seq, 1);
    assert_eq!(
        reported,
        (1..=total).collect::<Vec<_>>(),
        "every stored line reported once"
    );
    let next_seq = support::count(&mut conn, "SELECT next_seq AS count FROM job_log_heads").await;
    assert_eq!(next_seq, total + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resend_whose_line_straddles_the_committed_offset_is_refused_not_half_stored() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (id, epoch) = running_job(&mut conn).await;
    let first = chunk(0, &["abc", "def"]);
    let committed = end_of(&first);
    db::logs::append(&mut conn, id, epoch, 0, &first)
        .await
        .expect("append")
        .expect("no gap");
    // Re-split: one line from byte 2 to past the committed offset.
    let straddling = chunk(2, &["c\ndef\nghi"]);
    let refused = db::logs::append(&mut conn, id, epoch, 2, &straddling)
        .await
        .expect("db");
    assert_eq!(
        refused,
        Err(OffsetGap {
            given: 2,
            committed
        })
    );
    assert_eq!(
        stored_lines(&mut conn, id).await.len(),
        2,
        "nothing half-stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_org_deletes_its_jobs_lines_and_attempts_and_no_one_elses() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let (gone, gone_epoch) = running_job(&mut conn).await;
    let other_org = support::org(&mut conn, "globex").await;
    let kept = create_one(&mut conn, &other_org, job("build"))
        .await
        .job_id();
    let kept_epoch = lease_and_start(&mut conn, kept, AgentId::new()).await.epoch as u64;
    for (id, epoch) in [(gone, gone_epoch), (kept, kept_epoch)] {
        db::logs::append(&mut conn, id, epoch, 0, &chunk(0, &["one", "two"]))
            .await
            .expect("append")
            .expect("no gap");
        db::leases::succeed(&mut conn, id, epoch, Some(0))
            .await
            .expect("succeed");
    }

    support::exec(&mut conn, "DELETE FROM orgs WHERE id = 'acme'").await;

    assert_eq!(stored_lines(&mut conn, gone).await, []);
    assert_eq!(stored_lines(&mut conn, kept).await.len(), 2);
    assert_eq!(support::attempts_of(&mut conn, gone).await.len(), 0);
    assert_eq!(support::attempts_of(&mut conn, kept).await.len(), 1);
}
