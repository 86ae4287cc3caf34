-- Switchyard's initial schema. PostgreSQL is the single source of truth;
-- Redis only carries wake-ups and live fan-out.
--
-- Hot-path design (see shared/reference/performance.md §2, §6):
--  * The ready set is a partial index over `jobs` (status = 'queued'), so a
--    claim is one row update and a completion one more, with no companion
--    rows to insert and delete. Columns that change while a job is leased
--    (lease deadline, heartbeats) are in no index but the small partial
--    index of leased jobs.
--  * The current lease lives on the job row (epoch, agent, deadline), so
--    every agent write is one statement guarded by `lease_epoch`.
--  * Finished attempts are appended to `attempts` once, when they end.
--  * Enumerations are text with CHECK constraints: readable in psql, and
--    the allowed values mirror the `domain` crate.

CREATE TABLE orgs (
    id          text PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 128),
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE org_settings (
    org_id               text PRIMARY KEY REFERENCES orgs (id) ON DELETE CASCADE,
    max_concurrent_jobs  integer CHECK (max_concurrent_jobs > 0),
    default_retry_policy jsonb NOT NULL DEFAULT '{}',
    default_queue        text NOT NULL DEFAULT 'backlog',
    approval_policy      text NOT NULL DEFAULT 'per_job'
                         CHECK (approval_policy IN ('per_job', 'always')),
    queue_precedence     text[] NOT NULL DEFAULT '{rework,backlog}',
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE repositories (
    id                   uuid PRIMARY KEY,
    org_id               text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name                 text NOT NULL,
    url                  text,
    max_concurrent_jobs  integer CHECK (max_concurrent_jobs > 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE registration_tokens (
    id          uuid PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    -- SHA-256 of the token; the token itself is shown once and never stored.
    token_hash  bytea NOT NULL UNIQUE,
    description text,
    labels      text[] NOT NULL DEFAULT '{}',
    max_uses    integer NOT NULL CHECK (max_uses > 0),
    uses        integer NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK (uses <= max_uses)
);
CREATE INDEX registration_tokens_org ON registration_tokens (org_id, id DESC);

CREATE TABLE agents (
    id                    uuid PRIMARY KEY,
    org_id                text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name                  text NOT NULL,
    labels                text[] NOT NULL DEFAULT '{}',
    capacity              integer NOT NULL CHECK (capacity > 0),
    version               text NOT NULL DEFAULT '',
    status                text NOT NULL DEFAULT 'offline'
                          CHECK (status IN ('online', 'offline', 'draining', 'revoked')),
    registration_token_id uuid REFERENCES registration_tokens (id) ON DELETE SET NULL,
    -- Which gateway replica holds the agent's session, so assignments can be
    -- routed to it over Redis.
    gateway_id            text,
    session_id            uuid,
    connected_at          timestamptz,
    last_seen_at          timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    revoked_at            timestamptz
);
CREATE INDEX agents_org ON agents (org_id, id);
CREATE INDEX agents_online ON agents (org_id) WHERE status = 'online';

CREATE TABLE agent_credentials (
    id          uuid PRIMARY KEY,
    agent_id    uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    -- SHA-256 of the agent secret; secrets are 256-bit random, so a fast
    -- hash is enough and lookups stay O(1).
    secret_hash bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX agent_credentials_agent ON agent_credentials (agent_id);

-- Positions leave room between neighbours so a reorder usually rewrites one row.
CREATE SEQUENCE job_position_seq AS bigint INCREMENT BY 1048576;

CREATE TABLE jobs (
    id                   uuid PRIMARY KEY,
    org_id               text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    repository_id        uuid REFERENCES repositories (id) ON DELETE SET NULL,
    queue                text NOT NULL,
    -- Rank of `queue` in the org's precedence, kept here so the ready index
    -- orders by it; rewritten for the org's queued jobs when settings change.
    queue_rank           smallint NOT NULL DEFAULT 0,
    priority             integer NOT NULL DEFAULT 0,
    position             bigint NOT NULL DEFAULT nextval('job_position_seq'),
    status               text NOT NULL CHECK (status IN (
                             'pending_approval', 'queued', 'leased', 'running', 'cancel_requested',
                             'succeeded', 'failed', 'cancelled', 'timed_out', 'dead')),
    required_labels      text[] NOT NULL DEFAULT '{}',
    concurrency_key      text,
    concurrency_limit    integer CHECK (concurrency_limit > 0),
    requires_approval    boolean NOT NULL DEFAULT false,
    payload              jsonb NOT NULL,
    metadata             jsonb NOT NULL DEFAULT '{}',
    retry_policy         jsonb NOT NULL,
    schedule_to_start_ms bigint,
    run_timeout_ms       bigint,
    deadline_at          timestamptz,
    -- Earliest time the job may start: the client's run-at, or a retry's backoff.
    run_at               timestamptz NOT NULL DEFAULT now(),
    -- Fencing token: bumped by every lease; every agent write must match it.
    lease_epoch          bigint NOT NULL DEFAULT 0,
    app_failures         integer NOT NULL DEFAULT 0,
    infra_failures       integer NOT NULL DEFAULT 0,
    cancel_reason        text CHECK (cancel_reason IN ('user', 'run_timeout', 'deadline')),
    -- The current lease (while leased, running or cancel_requested).
    agent_id             uuid,
    -- Ack deadline while leased, heartbeat deadline while running.
    lease_expires_at     timestamptz,
    leased_at            timestamptz,
    started_at           timestamptz,
    run_deadline_at      timestamptz,
    cancel_requested_at  timestamptz,
    -- After this the cancel is forced and the lease revoked.
    cancel_deadline_at   timestamptz,
    -- The last attempt's result.
    exit_code            integer,
    error_kind           text,
    error_message        text,
    created_by           text,
    request_id           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- When the job last entered the queue (for wait-time statistics).
    queued_at            timestamptz,
    finished_at          timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- The ready set, in service order within an org.
CREATE INDEX jobs_ready ON jobs (org_id, queue_rank, priority DESC, position)
    WHERE status = 'queued';
-- Earliest run-at among queued jobs: how long the scheduler may sleep.
CREATE INDEX jobs_ready_run_at ON jobs (run_at) WHERE status = 'queued';
-- Leased jobs, for expiry sweeps and per-agent / per-org counts.
CREATE INDEX jobs_leased ON jobs (lease_expires_at)
    WHERE status IN ('leased', 'running', 'cancel_requested');
CREATE INDEX jobs_leased_agent ON jobs (agent_id)
    WHERE status IN ('leased', 'running', 'cancel_requested');
CREATE INDEX jobs_pending_approval ON jobs (org_id, id) WHERE status = 'pending_approval';
-- Listing: UUIDv7 ids are time-ordered, so `id DESC` is newest first and a
-- keyset cursor is stable under concurrent inserts.
CREATE INDEX jobs_org_listing ON jobs (org_id, id DESC);
CREATE INDEX jobs_org_status_listing ON jobs (org_id, status, id DESC);
CREATE INDEX jobs_repository ON jobs (repository_id, id DESC) WHERE repository_id IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (org_id, finished_at) WHERE finished_at IS NOT NULL;

-- One row per attempt, written when the attempt ends.
CREATE TABLE attempts (
    job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    epoch         bigint NOT NULL,
    attempt       integer NOT NULL,
    agent_id      uuid NOT NULL,
    leased_at     timestamptz NOT NULL,
    started_at    timestamptz,
    ended_at      timestamptz NOT NULL DEFAULT now(),
    outcome       text NOT NULL CHECK (outcome IN (
                      'succeeded', 'failed', 'lost', 'released', 'cancelled', 'timed_out')),
    exit_code     integer,
    error_kind    text,
    error_message text,
    PRIMARY KEY (job_id, epoch)
);
CREATE INDEX attempts_agent ON attempts (agent_id, ended_at DESC);

-- Concurrency-key slots, one row per held slot. The primary key makes it
-- impossible to hold more than `limit` slots (slot numbers run 0..limit),
-- and a slot is released in the same statement that ends its lease.
CREATE TABLE concurrency_slots (
    org_id     text NOT NULL,
    key        text NOT NULL,
    slot       integer NOT NULL CHECK (slot >= 0),
    job_id     uuid NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    epoch      bigint NOT NULL,
    PRIMARY KEY (org_id, key, slot)
);

-- Log lines with a gapless per-job sequence starting at 1.
CREATE TABLE job_logs (
    job_id   uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq      bigint NOT NULL,
    epoch    bigint NOT NULL,
    stream   text NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    at       timestamptz NOT NULL,
    line     text NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- Where each job's log stands: the next sequence number, and how many bytes
-- of the current attempt's output are committed (the resume point an agent
-- is told in a log ack).
CREATE TABLE job_log_heads (
    job_id           uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    next_seq         bigint NOT NULL DEFAULT 1,
    epoch            bigint NOT NULL DEFAULT 0,
    committed_offset bigint NOT NULL DEFAULT 0
);

CREATE TABLE approvals (
    id         uuid PRIMARY KEY,
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    decision   text NOT NULL CHECK (decision IN ('approved', 'rejected')),
    decided_by text NOT NULL,
    comment    text,
    decided_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX approvals_job ON approvals (job_id);

CREATE TABLE idempotency_keys (
    org_id       text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    key          text NOT NULL,
    -- SHA-256 of the canonical request body: same key, other body = 422.
    request_hash bytea NOT NULL,
    job_ids      uuid[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TABLE audit_events (
    id          uuid PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    request_id  text,
    details     jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_org ON audit_events (org_id, id DESC);

-- The queue and lease tables churn: vacuum them early.
ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
