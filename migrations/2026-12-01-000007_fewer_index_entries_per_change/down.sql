DROP INDEX jobs_org_status_listing;
CREATE INDEX jobs_org_status_listing ON jobs (org_id, status, id DESC);
DROP INDEX jobs_ready_group_oldest;
CREATE INDEX jobs_ready_group_oldest ON jobs
    (org_id, (COALESCE(repository_id, '00000000-0000-0000-0000-000000000000'::uuid)), position)
    WHERE status = 'queued';
DROP INDEX jobs_held;
CREATE INDEX jobs_leased_org ON jobs (org_id, repository_id)
    WHERE status IN ('leased', 'running', 'cancel_requested');
CREATE INDEX jobs_leased_agent ON jobs (agent_id)
    WHERE status IN ('leased', 'running', 'cancel_requested');
CREATE INDEX jobs_org_listing ON jobs (org_id, id DESC);
