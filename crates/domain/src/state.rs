//! The job state machine.
//!
//! Each allowed transition is a method on [`Lifecycle`] that returns the next
//! lifecycle or a [`DomainError`]. The data layer turns the same rules into
//! single guarded SQL statements: [`Action::sources`] is the `WHERE status =
//! ANY(…)` guard, and the lease epoch is the fencing token, so the database
//! and this module can never disagree about what is allowed.
//!
//! ```text
//! pending_approval ─approve→ queued ─lease→ leased ─start→ running ─succeed→ succeeded
//!        │reject                ▲  │             │expire/release   │fail → retry? → queued
//!        ▼                      └──┴─────────────┘                 │     non-retryable → failed
//!    cancelled ←─ cancel ack / forced ── cancel_requested ←─cancel─┘     budget spent → dead
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::job::JobStatus;
use crate::retry::{Failure, FailureCounts, RetryDecision, RetryPolicy};

/// Why a cancellation was requested; decides whether the job ends
/// `cancelled` (a person asked) or `timed_out` (a limit ran out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    User,
    RunTimeout,
    Deadline,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::User => "user",
            CancelReason::RunTimeout => "run_timeout",
            CancelReason::Deadline => "deadline",
        }
    }

    /// The terminal status a job reaches once this cancellation completes.
    pub fn final_status(self) -> JobStatus {
        match self {
            CancelReason::User => JobStatus::Cancelled,
            CancelReason::RunTimeout | CancelReason::Deadline => JobStatus::TimedOut,
        }
    }
}

/// Every kind of change a job can undergo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Approve,
    Reject,
    Lease,
    Start,
    Release,
    Succeed,
    Fail,
    RequestCancel,
    AcknowledgeCancel,
    ForceCancel,
    ExpireLease,
    ScheduleToStartTimeout,
    RunTimeout,
    DeadlineExceeded,
    Retry,
    Redrive,
}

impl Action {
    pub const ALL: [Action; 16] = [
        Action::Approve,
        Action::Reject,
        Action::Lease,
        Action::Start,
        Action::Release,
        Action::Succeed,
        Action::Fail,
        Action::RequestCancel,
        Action::AcknowledgeCancel,
        Action::ForceCancel,
        Action::ExpireLease,
        Action::ScheduleToStartTimeout,
        Action::RunTimeout,
        Action::DeadlineExceeded,
        Action::Retry,
        Action::Redrive,
    ];

    /// The statuses this action may start from.
    pub fn sources(self) -> &'static [JobStatus] {
        use JobStatus::*;
        match self {
            Action::Approve | Action::Reject => &[PendingApproval],
            Action::Lease | Action::ScheduleToStartTimeout => &[Queued],
            Action::Start => &[Leased],
            Action::Release => &[Leased, Running],
            Action::Succeed | Action::Fail | Action::ExpireLease => {
                &[Leased, Running, CancelRequested]
            }
            Action::RequestCancel => &[PendingApproval, Queued, Leased, Running, CancelRequested],
            Action::AcknowledgeCancel | Action::ForceCancel => &[CancelRequested],
            Action::RunTimeout => &[Running],
            Action::DeadlineExceeded => &[PendingApproval, Queued, Leased, Running],
            Action::Retry => &[Failed, Cancelled, TimedOut, Dead],
            Action::Redrive => &[Dead],
        }
    }

    /// Whether the action is a write by the agent holding the lease, and so
    /// must carry the current epoch.
    pub fn is_fenced(self) -> bool {
        matches!(
            self,
            Action::Start
                | Action::Release
                | Action::Succeed
                | Action::Fail
                | Action::AcknowledgeCancel
                | Action::ExpireLease
                | Action::RunTimeout
        )
    }

    /// Operator actions reopen finished jobs; nothing else may.
    pub fn reopens_terminal(self) -> bool {
        matches!(self, Action::Retry | Action::Redrive)
    }

    pub fn verb(self) -> &'static str {
        match self {
            Action::Approve => "be approved",
            Action::Reject => "be rejected",
            Action::Lease => "be leased",
            Action::Start => "start",
            Action::Release => "be released",
            Action::Succeed => "succeed",
            Action::Fail => "fail",
            Action::RequestCancel => "be cancelled",
            Action::AcknowledgeCancel => "acknowledge a cancel",
            Action::ForceCancel => "be force-cancelled",
            Action::ExpireLease => "lose its lease",
            Action::ScheduleToStartTimeout => "time out in the queue",
            Action::RunTimeout => "time out while running",
            Action::DeadlineExceeded => "pass its deadline",
            Action::Retry => "be retried",
            Action::Redrive => "be redriven",
        }
    }
}

/// The part of a job the state machine reasons about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    pub status: JobStatus,
    /// Fencing token: bumped by every lease, never decreased. 0 = never leased.
    pub epoch: u64,
    /// Failed attempts so far, per budget.
    pub failures: FailureCounts,
    pub cancel_reason: Option<CancelReason>,
}

/// What follows a failed or lost attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AfterFailure {
    pub next: Lifecycle,
    /// Set when the job was queued again: wait this long before running it.
    pub retry_after: Option<Duration>,
}

impl Lifecycle {
    pub fn new(status: JobStatus) -> Self {
        Self {
            status,
            epoch: 0,
            failures: FailureCounts::default(),
            cancel_reason: None,
        }
    }

    /// The number of the attempt that a lease made now would run. Leases
    /// that were released or never acknowledged do not count.
    pub fn attempt(&self) -> u32 {
        self.failures.application + self.failures.infrastructure + 1
    }

    fn check(&self, action: Action) -> Result<(), DomainError> {
        if action.sources().contains(&self.status) {
            Ok(())
        } else {
            Err(DomainError::InvalidTransition {
                from: self.status,
                action: action.verb(),
            })
        }
    }

    fn check_fenced(&self, action: Action, epoch: u64) -> Result<(), DomainError> {
        if epoch != self.epoch {
            return Err(DomainError::StaleEpoch {
                given: epoch,
                current: self.epoch,
            });
        }
        self.check(action)
    }

    fn with_status(&self, status: JobStatus) -> Self {
        Self {
            status,
            ..self.clone()
        }
    }

    pub fn approve(&self) -> Result<Self, DomainError> {
        self.check(Action::Approve)?;
        Ok(self.with_status(JobStatus::Queued))
    }

    pub fn reject(&self) -> Result<Self, DomainError> {
        self.check(Action::Reject)?;
        Ok(self.with_status(JobStatus::Cancelled))
    }

    /// Grants a new lease: the epoch goes up by one.
    pub fn lease(&self) -> Result<Self, DomainError> {
        self.check(Action::Lease)?;
        Ok(Self {
            status: JobStatus::Leased,
            epoch: self.epoch + 1,
            ..self.clone()
        })
    }

    /// The agent acknowledged the assignment and began work.
    pub fn start(&self, epoch: u64) -> Result<Self, DomainError> {
        self.check_fenced(Action::Start, epoch)?;
        Ok(self.with_status(JobStatus::Running))
    }

    /// The agent gives the job back (rejected assignment, drain, HTTP
    /// release) or never acknowledged it: queued again, no attempt spent.
    pub fn release(&self, epoch: u64) -> Result<Self, DomainError> {
        self.check_fenced(Action::Release, epoch)?;
        Ok(self.with_status(JobStatus::Queued))
    }

    pub fn succeed(&self, epoch: u64) -> Result<Self, DomainError> {
        self.check_fenced(Action::Succeed, epoch)?;
        Ok(Self {
            status: JobStatus::Succeeded,
            cancel_reason: None,
            ..self.clone()
        })
    }

    /// The attempt ended in failure. `unit` is a random number in [0, 1)
    /// for the backoff jitter.
    pub fn fail(
        &self,
        epoch: u64,
        failure: &Failure,
        policy: &RetryPolicy,
        unit: f64,
    ) -> Result<AfterFailure, DomainError> {
        self.check_fenced(Action::Fail, epoch)?;
        Ok(self.after_failure(failure, policy, unit))
    }

    /// The lease ran out (no heartbeat, agent gone). A lease never
    /// acknowledged is simply requeued; a running attempt counts as an
    /// infrastructure failure.
    pub fn expire_lease(
        &self,
        epoch: u64,
        failure: &Failure,
        policy: &RetryPolicy,
        unit: f64,
    ) -> Result<AfterFailure, DomainError> {
        self.check_fenced(Action::ExpireLease, epoch)?;
        if self.status == JobStatus::Leased {
            return Ok(AfterFailure {
                next: self.with_status(JobStatus::Queued),
                retry_after: None,
            });
        }
        Ok(self.after_failure(failure, policy, unit))
    }

    fn after_failure(&self, failure: &Failure, policy: &RetryPolicy, unit: f64) -> AfterFailure {
        if let Some(reason) = self
            .cancel_reason
            .filter(|_| self.status == JobStatus::CancelRequested)
        {
            return AfterFailure {
                next: self.with_status(reason.final_status()),
                retry_after: None,
            };
        }
        let failures = self.failures.record(failure);
        let (status, retry_after) = match policy.decide(failure, failures, unit) {
            RetryDecision::Retry { delay } => (JobStatus::Queued, Some(delay)),
            RetryDecision::NonRetryable => (JobStatus::Failed, None),
            RetryDecision::Exhausted => (JobStatus::Dead, None),
        };
        AfterFailure {
            next: Self {
                status,
                failures,
                ..self.clone()
            },
            retry_after,
        }
    }

    /// A person asks to cancel. Jobs not yet leased end at once; leased
    /// ones wait for the agent (or the grace period). Asking again is a no-op.
    pub fn request_cancel(&self) -> Result<Self, DomainError> {
        self.check(Action::RequestCancel)?;
        Ok(match self.status {
            JobStatus::PendingApproval | JobStatus::Queued => {
                self.with_status(JobStatus::Cancelled)
            }
            JobStatus::CancelRequested => self.clone(),
            _ => self.cancel_requested(CancelReason::User),
        })
    }

    fn cancel_requested(&self, reason: CancelReason) -> Self {
        Self {
            status: JobStatus::CancelRequested,
            cancel_reason: Some(reason),
            ..self.clone()
        }
    }

    fn cancel_finished(&self) -> Self {
        let reason = self.cancel_reason.unwrap_or(CancelReason::User);
        self.with_status(reason.final_status())
    }

    /// The agent confirms it stopped the job.
    pub fn acknowledge_cancel(&self, epoch: u64) -> Result<Self, DomainError> {
        self.check_fenced(Action::AcknowledgeCancel, epoch)?;
        Ok(self.cancel_finished())
    }

    /// The grace period ran out without an acknowledgement: the lease is revoked.
    pub fn force_cancel(&self) -> Result<Self, DomainError> {
        self.check(Action::ForceCancel)?;
        Ok(self.cancel_finished())
    }

    /// Waited too long in the queue. Never retried: a retry would only
    /// queue it again.
    pub fn schedule_to_start_timeout(&self) -> Result<Self, DomainError> {
        self.check(Action::ScheduleToStartTimeout)?;
        Ok(self.with_status(JobStatus::TimedOut))
    }

    /// The attempt ran too long: cancel it, then time it out.
    pub fn run_timeout(&self, epoch: u64) -> Result<Self, DomainError> {
        self.check_fenced(Action::RunTimeout, epoch)?;
        Ok(self.cancel_requested(CancelReason::RunTimeout))
    }

    /// The overall deadline passed: unleased jobs time out at once, leased
    /// ones are cancelled first.
    pub fn deadline_exceeded(&self) -> Result<Self, DomainError> {
        self.check(Action::DeadlineExceeded)?;
        Ok(match self.status {
            JobStatus::PendingApproval | JobStatus::Queued => self.with_status(JobStatus::TimedOut),
            _ => self.cancel_requested(CancelReason::Deadline),
        })
    }

    /// An operator runs a finished job again with a fresh budget. The epoch
    /// is kept so that writes from any earlier attempt stay stale.
    pub fn retry(&self) -> Result<Self, DomainError> {
        self.check(Action::Retry)?;
        Ok(self.reopened())
    }

    /// Takes a job out of the dead-letter set and queues it again.
    pub fn redrive(&self) -> Result<Self, DomainError> {
        self.check(Action::Redrive)?;
        Ok(self.reopened())
    }

    fn reopened(&self) -> Self {
        Self {
            status: JobStatus::Queued,
            epoch: self.epoch,
            failures: FailureCounts::default(),
            cancel_reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::retry::InfraReason;

    const APP: Failure = Failure::Application { error_kind: None };
    const LOST: Failure = Failure::Infrastructure {
        reason: InfraReason::LeaseExpired,
    };

    fn at(status: JobStatus, epoch: u64) -> Lifecycle {
        Lifecycle {
            status,
            epoch,
            failures: FailureCounts::default(),
            cancel_reason: if status == JobStatus::CancelRequested {
                Some(CancelReason::User)
            } else {
                None
            },
        }
    }

    /// Applies `action` with the job's current epoch.
    fn apply(state: &Lifecycle, action: Action) -> Result<Lifecycle, DomainError> {
        let policy = RetryPolicy::default();
        let epoch = state.epoch;
        match action {
            Action::Approve => state.approve(),
            Action::Reject => state.reject(),
            Action::Lease => state.lease(),
            Action::Start => state.start(epoch),
            Action::Release => state.release(epoch),
            Action::Succeed => state.succeed(epoch),
            Action::Fail => state.fail(epoch, &APP, &policy, 0.5).map(|a| a.next),
            Action::RequestCancel => state.request_cancel(),
            Action::AcknowledgeCancel => state.acknowledge_cancel(epoch),
            Action::ForceCancel => state.force_cancel(),
            Action::ExpireLease => state
                .expire_lease(epoch, &LOST, &policy, 0.5)
                .map(|a| a.next),
            Action::ScheduleToStartTimeout => state.schedule_to_start_timeout(),
            Action::RunTimeout => state.run_timeout(epoch),
            Action::DeadlineExceeded => state.deadline_exceeded(),
            Action::Retry => state.retry(),
            Action::Redrive => state.redrive(),
        }
    }

    #[test]
    fn every_forbidden_transition_is_rejected_and_every_allowed_one_accepted() {
        for action in Action::ALL {
            for status in JobStatus::ALL {
                let state = at(status, 3);
                let result = apply(&state, action);
                if action.sources().contains(&status) {
                    assert!(result.is_ok(), "{action:?} from {status} should be allowed");
                } else {
                    assert_eq!(
                        result,
                        Err(DomainError::InvalidTransition {
                            from: status,
                            action: action.verb()
                        }),
                        "{action:?} from {status} should be forbidden"
                    );
                }
            }
        }
    }

    #[test]
    fn fenced_actions_reject_stale_epochs_without_change() {
        let policy = RetryPolicy::default();
        let running = at(JobStatus::Running, 5);
        let stale = Err(DomainError::StaleEpoch {
            given: 4,
            current: 5,
        });
        assert_eq!(running.succeed(4), stale);
        assert_eq!(running.release(4), stale);
        assert_eq!(running.run_timeout(4), stale);
        assert_eq!(running.fail(4, &APP, &policy, 0.1).map(|a| a.next), stale);
        assert_eq!(
            running.expire_lease(4, &LOST, &policy, 0.1).map(|a| a.next),
            stale
        );
        assert_eq!(
            at(JobStatus::Leased, 5).start(6),
            Err(DomainError::StaleEpoch {
                given: 6,
                current: 5
            })
        );
        assert_eq!(
            at(JobStatus::CancelRequested, 5).acknowledge_cancel(1),
            Err(DomainError::StaleEpoch {
                given: 1,
                current: 5
            })
        );
    }

    #[test]
    fn the_happy_path() {
        let job = Lifecycle::new(JobStatus::PendingApproval);
        let job = job.approve().and_then(|j| j.lease()).expect("lease");
        assert_eq!(
            (job.status, job.epoch, job.attempt()),
            (JobStatus::Leased, 1, 1)
        );
        let job = job.start(1).and_then(|j| j.succeed(1)).expect("succeed");
        assert_eq!(job.status, JobStatus::Succeeded);
    }

    #[test]
    fn failures_retry_until_the_budget_then_go_dead() {
        let policy = RetryPolicy {
            maximum_attempts: 2,
            ..RetryPolicy::default()
        };
        let mut job = Lifecycle::new(JobStatus::Queued);
        job = job.lease().and_then(|j| j.start(1)).expect("first attempt");
        let first = job.fail(1, &APP, &policy, 0.5).expect("fail");
        assert_eq!(first.next.status, JobStatus::Queued);
        assert!(first.retry_after.is_some());
        assert_eq!(first.next.attempt(), 2);
        job = first
            .next
            .lease()
            .and_then(|j| j.start(2))
            .expect("second attempt");
        let second = job.fail(2, &APP, &policy, 0.5).expect("fail");
        assert_eq!(second.next.status, JobStatus::Dead);
        assert_eq!(second.retry_after, None);
        let redriven = second.next.redrive().expect("redrive");
        assert_eq!(redriven.status, JobStatus::Queued);
        assert_eq!(redriven.failures, FailureCounts::default());
        assert_eq!(
            redriven.epoch, 2,
            "redrive keeps the epoch so old writers stay stale"
        );
    }

    #[test]
    fn an_unacknowledged_or_released_lease_spends_no_attempt() {
        let policy = RetryPolicy::default();
        let leased = Lifecycle::new(JobStatus::Queued).lease().expect("lease");
        let expired = leased.expire_lease(1, &LOST, &policy, 0.5).expect("expire");
        assert_eq!(expired.next.status, JobStatus::Queued);
        assert_eq!(expired.next.failures, FailureCounts::default());
        assert_eq!(expired.next.attempt(), 1);
        let released = expired
            .next
            .lease()
            .and_then(|j| j.release(2))
            .expect("release");
        assert_eq!(released.attempt(), 1);
    }

    #[test]
    fn a_lost_running_attempt_is_an_infrastructure_failure() {
        let policy = RetryPolicy {
            maximum_attempts: 1,
            ..RetryPolicy::default()
        };
        let running = at(JobStatus::Running, 1);
        let after = running
            .expire_lease(1, &LOST, &policy, 0.5)
            .expect("expire");
        assert_eq!(after.next.status, JobStatus::Queued);
        assert_eq!(after.next.failures.infrastructure, 1);
        assert_eq!(after.next.failures.application, 0);
    }

    #[test]
    fn cancellation_is_a_state_machine() {
        let queued = at(JobStatus::Queued, 0);
        assert_eq!(
            queued.request_cancel().map(|j| j.status),
            Ok(JobStatus::Cancelled)
        );

        let running = at(JobStatus::Running, 2);
        let requested = running.request_cancel().expect("request");
        assert_eq!(requested.status, JobStatus::CancelRequested);
        assert_eq!(
            requested.request_cancel(),
            Ok(requested.clone()),
            "idempotent"
        );
        assert_eq!(
            requested.acknowledge_cancel(2).map(|j| j.status),
            Ok(JobStatus::Cancelled)
        );
        assert_eq!(
            requested.force_cancel().map(|j| j.status),
            Ok(JobStatus::Cancelled)
        );
        let policy = RetryPolicy::default();
        let failed_meanwhile = requested.fail(2, &APP, &policy, 0.5).expect("fail");
        assert_eq!(
            failed_meanwhile.next.status,
            JobStatus::Cancelled,
            "no retry after cancel"
        );
        assert_eq!(
            requested.succeed(2).map(|j| j.status),
            Ok(JobStatus::Succeeded)
        );
    }

    #[test]
    fn timeouts_end_in_timed_out() {
        let running = at(JobStatus::Running, 1);
        let cancelling = running.run_timeout(1).expect("run timeout");
        assert_eq!(cancelling.cancel_reason, Some(CancelReason::RunTimeout));
        assert_eq!(
            cancelling.force_cancel().map(|j| j.status),
            Ok(JobStatus::TimedOut)
        );
        assert_eq!(
            at(JobStatus::Queued, 0)
                .schedule_to_start_timeout()
                .map(|j| j.status),
            Ok(JobStatus::TimedOut)
        );
        assert_eq!(
            at(JobStatus::Queued, 0)
                .deadline_exceeded()
                .map(|j| j.status),
            Ok(JobStatus::TimedOut)
        );
        let past_deadline = running.deadline_exceeded().expect("deadline");
        assert_eq!(past_deadline.status, JobStatus::CancelRequested);
        assert_eq!(
            past_deadline.acknowledge_cancel(1).map(|j| j.status),
            Ok(JobStatus::TimedOut)
        );
    }

    #[test]
    fn non_retryable_errors_fail_for_good() {
        let policy = RetryPolicy {
            non_retryable_error_kinds: vec!["invalid_repo".into()],
            ..RetryPolicy::default()
        };
        let failure = Failure::Application {
            error_kind: Some("invalid_repo".into()),
        };
        let after = at(JobStatus::Running, 1)
            .fail(1, &failure, &policy, 0.5)
            .expect("fail");
        assert_eq!(after.next.status, JobStatus::Failed);
    }

    /// One random event: an action plus how wrong its epoch is (0 = current).
    #[derive(Clone, Debug)]
    struct Event {
        action: Action,
        epoch_skew: i8,
        infra: bool,
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            proptest::sample::select(Action::ALL.to_vec()),
            prop_oneof![4 => Just(0i8), 1 => -2i8..=2],
            any::<bool>(),
        )
            .prop_map(|(action, epoch_skew, infra)| Event {
                action,
                epoch_skew,
                infra,
            })
    }

    fn step(
        state: &Lifecycle,
        event: &Event,
        policy: &RetryPolicy,
        unit: f64,
    ) -> Result<Lifecycle, DomainError> {
        let epoch = state.epoch.saturating_add_signed(event.epoch_skew as i64);
        let failure = if event.infra { LOST } else { APP };
        match event.action {
            Action::Start => state.start(epoch),
            Action::Release => state.release(epoch),
            Action::Succeed => state.succeed(epoch),
            Action::Fail => state.fail(epoch, &failure, policy, unit).map(|a| a.next),
            Action::AcknowledgeCancel => state.acknowledge_cancel(epoch),
            Action::ExpireLease => state
                .expire_lease(epoch, &failure, policy, unit)
                .map(|a| a.next),
            Action::RunTimeout => state.run_timeout(epoch),
            other => apply(state, other),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn invariants_hold_over_random_event_sequences(
            start_with_approval in any::<bool>(),
            events in proptest::collection::vec(event(), 0..80),
            max_app in 0u32..5,
            max_infra in 0u32..5,
            unit in 0.0f64..1.0,
        ) {
            let policy = RetryPolicy {
                maximum_attempts: max_app,
                maximum_infrastructure_attempts: max_infra,
                ..RetryPolicy::default()
            };
            let mut state = Lifecycle::new(if start_with_approval {
                JobStatus::PendingApproval
            } else {
                JobStatus::Queued
            });
            for event in &events {
                let before = state.clone();
                // A rejected event changes nothing: transitions take `&self`.
                if let Ok(next) = step(&before, event, &policy, unit) {
                    // A terminal job never changes, except by an operator's retry/redrive.
                    if before.status.is_terminal() {
                        prop_assert!(event.action.reopens_terminal(),
                            "{:?} changed terminal {}", event.action, before.status);
                    }
                    // An epoch never decreases, and only a lease raises it (by one).
                    if event.action == Action::Lease {
                        prop_assert_eq!(next.epoch, before.epoch + 1);
                    } else {
                        prop_assert_eq!(next.epoch, before.epoch);
                    }
                    // Fenced writes succeed only with the current epoch.
                    if event.action.is_fenced() {
                        let given = before.epoch.saturating_add_signed(event.epoch_skew as i64);
                        prop_assert_eq!(given, before.epoch);
                    }
                    // Attempts never exceed their budgets.
                    if max_app > 0 {
                        prop_assert!(next.failures.application <= max_app);
                    }
                    if max_infra > 0 {
                        prop_assert!(next.failures.infrastructure <= max_infra);
                    }
                    // A job holding a lease has been leased at least once.
                    if next.status.holds_lease() {
                        prop_assert!(next.epoch >= 1);
                    }
                    // A job goes dead only once a budget is spent.
                    if next.status == JobStatus::Dead {
                        prop_assert!(
                            (max_app > 0 && next.failures.application >= max_app)
                            || (max_infra > 0 && next.failures.infrastructure >= max_infra)
                        );
                    }
                    state = next;
                }
            }
        }
    }
}
