//! Which trace each job belongs to, learned from the wake-ups. A job's
//! creation (and every later status change an agent reports) reaches the
//! scheduler on `scheduler:wake` with the trace context of the request or
//! agent message that caused it; the offer for that job continues that
//! trace, so a job's life reads as one trace.
//!
//! A dispatch tick serves many jobs, so it gets a span of its own, *linked*
//! to the wake-ups it answers, and each job's offer is a span that continues
//! the job's own trace (or, for a job whose origin this replica never saw,
//! a child of the dispatch span).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use domain::JobId;
use domain::events::{Envelope, Event, TraceContext};

/// Jobs remembered at most; beyond this the oldest entries are dropped.
const MAX_JOBS: usize = 10_000;
/// Wake-ups linked from one dispatch span at most.
const MAX_LINKS: usize = 32;
/// A job not dispatched within this is forgotten (its offer starts a span
/// under the dispatch instead).
const KEEP_FOR: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub(crate) struct TraceBook {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    jobs: HashMap<JobId, (TraceContext, Instant)>,
    wakeups: Vec<TraceContext>,
}

impl TraceBook {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes the trace of a wake-up, and of the job it is about.
    pub fn record(&self, envelope: &Envelope) {
        let Some(trace) = &envelope.trace else {
            return;
        };
        let job = match &envelope.event {
            Event::JobCreated { job_id, .. } | Event::JobStatusChanged { job_id, .. } => {
                Some(*job_id)
            }
            _ => None,
        };
        let mut book = self.book();
        if book.wakeups.len() < MAX_LINKS && !book.wakeups.contains(trace) {
            book.wakeups.push(trace.clone());
        }
        if let Some(job) = job {
            if book.jobs.len() >= MAX_JOBS {
                let now = Instant::now();
                book.jobs
                    .retain(|_, (_, at)| now.duration_since(*at) < KEEP_FOR);
                if book.jobs.len() >= MAX_JOBS
                    && let Some(oldest) = book
                        .jobs
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(id, _)| *id)
                {
                    book.jobs.remove(&oldest);
                }
            }
            book.jobs.insert(job, (trace.clone(), Instant::now()));
        }
    }

    /// The wake-ups since the last dispatch, to link from its span.
    pub fn take_wakeups(&self) -> Vec<TraceContext> {
        std::mem::take(&mut self.book().wakeups)
    }

    /// The trace the job belongs to, if this replica has seen it.
    pub fn job(&self, job: JobId) -> Option<TraceContext> {
        self.book().jobs.get(&job).map(|(trace, _)| trace.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::OrgId;
    use domain::job::{JobStatus, QueueName};

    fn trace(n: u8) -> TraceContext {
        TraceContext {
            traceparent: format!("00-{:032x}-00f067aa0ba902b7-01", n),
            tracestate: None,
        }
    }

    #[test]
    fn jobs_keep_the_trace_of_their_latest_event_and_wakeups_are_taken_once() {
        let book = TraceBook::default();
        let org = OrgId::parse("acme").expect("org");
        let job = JobId::new();
        let created = Envelope::new(
            org.clone(),
            Event::JobCreated {
                job_id: job,
                queue: QueueName::backlog(),
                status: JobStatus::Queued,
            },
        )
        .with_trace(Some(trace(1)));
        book.record(&created);
        assert_eq!(book.job(job), Some(trace(1)));
        assert_eq!(book.job(JobId::new()), None);
        // An untraced event changes nothing.
        book.record(&Envelope::new(org, created.event.clone()));
        assert_eq!(book.take_wakeups(), vec![trace(1)]);
        assert!(book.take_wakeups().is_empty());
    }
}
