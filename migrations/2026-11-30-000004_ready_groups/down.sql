DROP INDEX jobs_ready_group;
DROP INDEX jobs_ready_group_oldest;
CREATE INDEX jobs_ready_group ON jobs (org_id, repository_id, queue_rank, priority DESC, position)
    WHERE status = 'queued';
CREATE INDEX jobs_ready_group_oldest ON jobs (org_id, repository_id, position)
    WHERE status = 'queued';
