DROP INDEX jobs_delayed;
CREATE INDEX jobs_ready_run_at ON jobs (run_at) WHERE status = 'queued';
