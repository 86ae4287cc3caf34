-- Jobs without a repository form one more fairness group, keyed by the nil
-- UUID (never a repository's id), so every group's heads come from the same
-- index walk. Before, `repository_id IS NULL` could not give the oldest
-- jobs in position order from an index: the planner read and sorted the
-- org's whole backlog on every dispatch (120 ms per tick at 100,000 queued
-- jobs).
DROP INDEX jobs_ready_group;
DROP INDEX jobs_ready_group_oldest;
CREATE INDEX jobs_ready_group ON jobs
    (org_id, (COALESCE(repository_id, '00000000-0000-0000-0000-000000000000'::uuid)),
     queue_rank, priority DESC, position)
    WHERE status = 'queued';
CREATE INDEX jobs_ready_group_oldest ON jobs
    (org_id, (COALESCE(repository_id, '00000000-0000-0000-0000-000000000000'::uuid)), position)
    WHERE status = 'queued';
