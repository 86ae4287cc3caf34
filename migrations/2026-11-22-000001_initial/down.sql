DROP TABLE IF EXISTS audit_events, idempotency_keys, approvals, job_log_heads, job_logs,
    concurrency_slots, attempts, jobs, agent_credentials, agents, registration_tokens,
    repositories, org_settings, orgs;
DROP SEQUENCE IF EXISTS job_position_seq;
