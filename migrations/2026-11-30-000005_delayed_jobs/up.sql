-- Only delayed jobs (a future run-at, a retry's backoff, a requeue) in the
-- run-at index. A job that may run at once is created with run_at equal to
-- created_at and no longer adds an entry here (one index insert fewer per
-- enqueue); the index serves one question, "when is the next delayed job
-- due", and stays a few pages however long the ready set grows.
DROP INDEX jobs_ready_run_at;
CREATE INDEX jobs_delayed ON jobs (run_at) WHERE status = 'queued' AND run_at > created_at;
