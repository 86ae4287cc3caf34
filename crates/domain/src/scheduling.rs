//! Dispatch order and placement: which queued job runs next, on which
//! agent, and — for jobs that cannot run yet — why not.
//!
//! [`order`] is the one ordering function: the scheduler uses it to pick
//! work and job-api uses it to show queue positions, so what a user sees is
//! what will happen.
//!
//! Order, most significant first:
//! 1. queue precedence (`rework` before `backlog` by default);
//! 2. effective priority: the job's priority plus one point per aging
//!    interval waited, so low-priority work is never starved for ever;
//! 3. round-robin across fairness groups (repositories; jobs without one
//!    form their own group): a flooding repository's 5,000th job ranks
//!    behind another repository's 1st;
//! 4. position within the queue (submission order, or where a reorder put it).
//!
//! Approval and run-at are eligibility, not order: jobs pending approval or
//! not yet due are never candidates.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, JobId, RepositoryId};
use crate::job::Labels;

/// A queued, due, approved job as the scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub job_id: JobId,
    pub repository_id: Option<RepositoryId>,
    pub queue_rank: i16,
    pub priority: i32,
    pub position: i64,
    /// When the job entered the queue (for aging).
    pub queued_at: DateTime<Utc>,
    pub required_labels: Labels,
    pub concurrency_key: Option<String>,
    pub concurrency_limit: u32,
}

impl Candidate {
    /// Priority plus one per full aging interval waited (capped).
    pub fn effective_priority(&self, now: DateTime<Utc>, aging: Option<Duration>) -> i64 {
        let boost = match aging {
            Some(interval) if !interval.is_zero() => {
                let waited = (now - self.queued_at).num_milliseconds().max(0) as u128;
                (waited / interval.as_millis()).min(MAX_AGING_BOOST as u128) as i64
            }
            _ => 0,
        };
        i64::from(self.priority) + boost
    }
}

/// Aging never lifts a job by more than this many priority points.
pub const MAX_AGING_BOOST: i64 = 1_000;

/// Sorts candidates into dispatch order (see the module docs).
pub fn order(candidates: &mut [Candidate], now: DateTime<Utc>, aging: Option<Duration>) {
    let priority: Vec<i64> = candidates
        .iter()
        .map(|c| c.effective_priority(now, aging))
        .collect();
    let tier = |i: usize| (candidates[i].queue_rank, Reverse(priority[i]));
    // Each job's round-robin turn: its rank by position within its
    // (queue, effective priority, repository) group.
    let mut by_group: Vec<usize> = (0..candidates.len()).collect();
    by_group.sort_by_key(|&i| (tier(i), candidates[i].repository_id, candidates[i].position));
    let mut turn = vec![0usize; candidates.len()];
    for pair in by_group.windows(2) {
        let (previous, current) = (pair[0], pair[1]);
        let same_group = tier(previous) == tier(current)
            && candidates[previous].repository_id == candidates[current].repository_id;
        turn[current] = if same_group { turn[previous] + 1 } else { 0 };
    }
    let mut dispatch_order = by_group;
    dispatch_order.sort_by_key(|&i| (tier(i), turn[i], candidates[i].position));
    let sorted: Vec<Candidate> = dispatch_order
        .iter()
        .map(|&i| candidates[i].clone())
        .collect();
    candidates.clone_from_slice(&sorted);
}

/// An agent with room for more work.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentOffer {
    pub agent_id: AgentId,
    pub labels: Labels,
    pub free: u32,
    /// Share of recent attempts that succeeded, 0..=1 (1 when unknown).
    pub success_rate: f64,
}

/// Current usage of the limits that constrain one org's dispatch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub org_max: Option<u32>,
    pub org_running: u32,
    /// Per repository: (limit, jobs holding leases).
    pub repositories: HashMap<RepositoryId, (Option<u32>, u32)>,
    /// Per concurrency key: slots held.
    pub keys_held: HashMap<String, u32>,
}

/// Why a job that could be dispatched was not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum BlockReason {
    AwaitingApproval,
    NotBefore {
        run_at: DateTime<Utc>,
    },
    OrgCapacityExhausted {
        limit: u32,
    },
    RepositoryCapacityExhausted {
        limit: u32,
    },
    ConcurrencyKeyHeld {
        key: String,
        limit: u32,
    },
    NoAgentWithLabels {
        labels: Vec<String>,
    },
    AllMatchingAgentsBusy,
    /// Eligible; others are ahead of it.
    WaitingForTurn,
}

/// The placement of one tick: jobs to lease, and why the rest wait.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub assignments: Vec<(JobId, AgentId)>,
    pub blocked: BTreeMap<JobId, BlockReason>,
}

/// Places ordered candidates on agents, respecting the org's, repositories'
/// and concurrency keys' limits and the agents' labels and capacity. Among
/// fitting agents the one with the better success rate wins, then the one
/// with more room. At most `max_assignments` leases are planned.
pub fn plan(
    ordered: &[Candidate],
    agents: &[AgentOffer],
    limits: &Limits,
    max_assignments: usize,
) -> Plan {
    let mut agents: Vec<AgentOffer> = agents.to_vec();
    agents.sort_by(|a, b| {
        b.success_rate
            .partial_cmp(&a.success_rate)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.free.cmp(&a.free))
            .then(a.agent_id.cmp(&b.agent_id))
    });
    let mut limits = limits.clone();
    let mut result = Plan::default();
    for candidate in ordered {
        if let Some(max) = limits.org_max
            && limits.org_running >= max
        {
            result.blocked.insert(
                candidate.job_id,
                BlockReason::OrgCapacityExhausted { limit: max },
            );
            continue;
        }
        if let Some(repo) = candidate.repository_id
            && let Some((Some(limit), running)) = limits.repositories.get(&repo)
            && running >= limit
        {
            result.blocked.insert(
                candidate.job_id,
                BlockReason::RepositoryCapacityExhausted { limit: *limit },
            );
            continue;
        }
        if let Some(key) = &candidate.concurrency_key
            && limits.keys_held.get(key).copied().unwrap_or(0) >= candidate.concurrency_limit
        {
            result.blocked.insert(
                candidate.job_id,
                BlockReason::ConcurrencyKeyHeld {
                    key: key.clone(),
                    limit: candidate.concurrency_limit,
                },
            );
            continue;
        }
        let fitting = agents
            .iter()
            .position(|a| a.free > 0 && candidate.required_labels.satisfied_by(&a.labels));
        let Some(index) = fitting else {
            let any_label_match = agents
                .iter()
                .any(|a| candidate.required_labels.satisfied_by(&a.labels));
            let reason = if any_label_match {
                BlockReason::AllMatchingAgentsBusy
            } else {
                BlockReason::NoAgentWithLabels {
                    labels: candidate.required_labels.to_vec(),
                }
            };
            result.blocked.insert(candidate.job_id, reason);
            continue;
        };
        if result.assignments.len() >= max_assignments {
            result
                .blocked
                .insert(candidate.job_id, BlockReason::WaitingForTurn);
            continue;
        }
        agents[index].free -= 1;
        limits.org_running += 1;
        if let Some(repo) = candidate.repository_id {
            limits.repositories.entry(repo).or_insert((None, 0)).1 += 1;
        }
        if let Some(key) = &candidate.concurrency_key {
            *limits.keys_held.entry(key.clone()).or_insert(0) += 1;
        }
        result
            .assignments
            .push((candidate.job_id, agents[index].agent_id));
    }
    result
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn candidate(repo: Option<RepositoryId>, position: i64) -> Candidate {
        Candidate {
            job_id: JobId::new(),
            repository_id: repo,
            queue_rank: 1,
            priority: 0,
            position,
            queued_at: Utc::now(),
            required_labels: Labels::default(),
            concurrency_key: None,
            concurrency_limit: 1,
        }
    }

    fn agent(free: u32, labels: &[&str], success_rate: f64) -> AgentOffer {
        AgentOffer {
            agent_id: AgentId::new(),
            labels: Labels::new(labels.iter().copied()),
            free,
            success_rate,
        }
    }

    #[test]
    fn queue_precedence_then_priority_then_position() {
        let now = Utc::now();
        let mut rework = candidate(None, 50);
        rework.queue_rank = 0;
        let mut urgent = candidate(None, 40);
        urgent.priority = 10;
        let early = candidate(None, 10);
        let late = candidate(None, 20);
        let mut list = vec![late.clone(), early.clone(), urgent.clone(), rework.clone()];
        order(&mut list, now, None);
        let ids: Vec<_> = list.iter().map(|c| c.job_id).collect();
        assert_eq!(
            ids,
            [rework.job_id, urgent.job_id, early.job_id, late.job_id]
        );
    }

    #[test]
    fn a_flooding_repository_does_not_starve_another() {
        let (flood, small) = (RepositoryId::new(), RepositoryId::new());
        let mut list: Vec<Candidate> = (0..1_000).map(|i| candidate(Some(flood), i)).collect();
        let late: Vec<Candidate> = (0..3).map(|i| candidate(Some(small), 10_000 + i)).collect();
        list.extend(late.iter().cloned());
        order(&mut list, Utc::now(), None);
        for job in &late {
            let at = list
                .iter()
                .position(|c| c.job_id == job.job_id)
                .expect("present");
            assert!(at < 6, "small repository's job at {at}");
        }
    }

    #[test]
    fn aging_lifts_long_waiting_jobs() {
        let now = Utc::now();
        let mut old_low = candidate(None, 1);
        old_low.priority = 0;
        old_low.queued_at = now - chrono::Duration::minutes(10);
        let mut fresh_high = candidate(None, 2);
        fresh_high.priority = 5;
        let mut list = vec![fresh_high.clone(), old_low.clone()];
        order(&mut list, now, Some(Duration::from_secs(60)));
        assert_eq!(
            list[0].job_id, old_low.job_id,
            "10 minutes at 1/min beats +5"
        );
        order(&mut list, now, None);
        assert_eq!(list[0].job_id, fresh_high.job_id);
    }

    #[test]
    fn placement_respects_labels_capacity_and_prefers_reliable_agents() {
        let mut gpu_job = candidate(None, 1);
        gpu_job.required_labels = Labels::new(["gpu"]);
        let plain = candidate(None, 2);
        let extra = candidate(None, 3);
        let flaky = agent(1, &["gpu"], 0.2);
        let solid = agent(1, &["gpu"], 0.9);
        let plan = plan(
            &[gpu_job.clone(), plain.clone(), extra.clone()],
            &[flaky.clone(), solid.clone()],
            &Limits::default(),
            10,
        );
        assert_eq!(
            plan.assignments,
            [
                (gpu_job.job_id, solid.agent_id),
                (plain.job_id, flaky.agent_id)
            ]
        );
        assert_eq!(
            plan.blocked[&extra.job_id],
            BlockReason::AllMatchingAgentsBusy
        );
    }

    #[test]
    fn placement_reports_missing_labels() {
        let mut job = candidate(None, 1);
        job.required_labels = Labels::new(["tpu"]);
        let plan = plan(
            &[job.clone()],
            &[agent(4, &["gpu"], 1.0)],
            &Limits::default(),
            10,
        );
        assert!(plan.assignments.is_empty());
        assert_eq!(
            plan.blocked[&job.job_id],
            BlockReason::NoAgentWithLabels {
                labels: vec!["tpu".into()]
            }
        );
    }

    #[test]
    fn org_repository_and_key_limits_hold() {
        let repo = RepositoryId::new();
        let mut keyed: Vec<Candidate> = (0..3)
            .map(|i| {
                let mut c = candidate(None, i);
                c.concurrency_key = Some("deploy".into());
                c.concurrency_limit = 2;
                c
            })
            .collect();
        let repo_jobs: Vec<Candidate> = (10..13).map(|i| candidate(Some(repo), i)).collect();
        keyed.extend(repo_jobs);
        let mut limits = Limits {
            org_max: Some(4),
            ..Limits::default()
        };
        limits.repositories.insert(repo, (Some(1), 0));
        limits.keys_held.insert("deploy".into(), 1);
        let plan = plan(&keyed, &[agent(100, &[], 1.0)], &limits, 100);
        // One key slot left (2 - 1 held), one repository slot: 2 leases.
        assert_eq!(plan.assignments.len(), 2);
        assert!(matches!(
            plan.blocked[&keyed[1].job_id],
            BlockReason::ConcurrencyKeyHeld { .. }
        ));
        assert!(matches!(
            plan.blocked[&keyed[4].job_id],
            BlockReason::RepositoryCapacityExhausted { limit: 1 }
        ));
    }

    proptest! {
        #[test]
        fn plans_never_exceed_any_limit(
            jobs in 0usize..60,
            agent_free in proptest::collection::vec(0u32..4, 0..6),
            org_max in proptest::option::of(0u32..20),
            key_limit in 1u32..4,
            max_assignments in 0usize..50,
        ) {
            let list: Vec<Candidate> = (0..jobs).map(|i| {
                let mut c = candidate(None, i as i64);
                if i % 2 == 0 {
                    c.concurrency_key = Some("k".into());
                    c.concurrency_limit = key_limit;
                }
                c
            }).collect();
            let agents: Vec<AgentOffer> = agent_free.iter().map(|f| agent(*f, &[], 1.0)).collect();
            let limits = Limits { org_max, ..Limits::default() };
            let plan = plan(&list, &agents, &limits, max_assignments);
            prop_assert!(plan.assignments.len() <= max_assignments);
            if let Some(max) = org_max {
                prop_assert!(plan.assignments.len() as u32 <= max);
            }
            for a in &agents {
                let given = plan.assignments.iter().filter(|(_, id)| *id == a.agent_id).count() as u32;
                prop_assert!(given <= a.free);
            }
            let keyed = plan.assignments.iter()
                .filter(|(job, _)| list.iter().any(|c| c.job_id == *job && c.concurrency_key.is_some()))
                .count() as u32;
            prop_assert!(keyed <= key_limit);
            prop_assert_eq!(plan.assignments.len() + plan.blocked.len(), list.len());
        }
    }
}
