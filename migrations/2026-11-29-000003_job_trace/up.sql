-- The W3C trace context of the request that created a job, so the job's
-- dispatch, run and logs join that trace whichever scheduler replica
-- leases it, and however late (after a restart, or by the sweep).
ALTER TABLE jobs ADD COLUMN traceparent text, ADD COLUMN tracestate text;
