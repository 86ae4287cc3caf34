-- Indexes for the scheduler's dispatch and sweeps.

-- Heads of each fairness group (repository) within an org's ready set, so a
-- tick can take the first few jobs of every repository without scanning a
-- flooding repository's backlog.
CREATE INDEX jobs_ready_group ON jobs (org_id, repository_id, queue_rank, priority DESC, position)
    WHERE status = 'queued';
CREATE INDEX jobs_ready_group_oldest ON jobs (org_id, repository_id, position)
    WHERE status = 'queued';
-- Leased jobs per org: the org's running count for its concurrency limit.
CREATE INDEX jobs_leased_org ON jobs (org_id, repository_id)
    WHERE status IN ('leased', 'running', 'cancel_requested');
-- Deadlines the sweeps look for.
CREATE INDEX jobs_cancel_deadline ON jobs (cancel_deadline_at) WHERE status = 'cancel_requested';
CREATE INDEX jobs_run_deadline ON jobs (run_deadline_at)
    WHERE status = 'running' AND run_deadline_at IS NOT NULL;
CREATE INDEX jobs_overall_deadline ON jobs (deadline_at)
    WHERE deadline_at IS NOT NULL
      AND status IN ('pending_approval', 'queued', 'leased', 'running');
CREATE INDEX jobs_schedule_to_start ON jobs (queued_at)
    WHERE status = 'queued' AND schedule_to_start_ms IS NOT NULL;
