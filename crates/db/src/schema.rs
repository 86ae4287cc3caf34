//! Diesel table definitions, written by hand to match `migrations/`.
//! The integration tests exercise every table, so a mismatch fails there.

diesel::table! {
    orgs (id) {
        id -> Text,
        name -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    org_settings (org_id) {
        org_id -> Text,
        max_concurrent_jobs -> Nullable<Int4>,
        default_retry_policy -> Jsonb,
        default_queue -> Text,
        approval_policy -> Text,
        queue_precedence -> Array<Text>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    repositories (id) {
        id -> Uuid,
        org_id -> Text,
        name -> Text,
        url -> Nullable<Text>,
        max_concurrent_jobs -> Nullable<Int4>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    registration_tokens (id) {
        id -> Uuid,
        org_id -> Text,
        token_hash -> Bytea,
        description -> Nullable<Text>,
        labels -> Array<Text>,
        max_uses -> Int4,
        uses -> Int4,
        expires_at -> Timestamptz,
        created_by -> Text,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    agents (id) {
        id -> Uuid,
        org_id -> Text,
        name -> Text,
        labels -> Array<Text>,
        capacity -> Int4,
        version -> Text,
        status -> Text,
        registration_token_id -> Nullable<Uuid>,
        gateway_id -> Nullable<Text>,
        session_id -> Nullable<Uuid>,
        connected_at -> Nullable<Timestamptz>,
        last_seen_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    agent_credentials (id) {
        id -> Uuid,
        agent_id -> Uuid,
        secret_hash -> Bytea,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    jobs (id) {
        id -> Uuid,
        org_id -> Text,
        repository_id -> Nullable<Uuid>,
        queue -> Text,
        queue_rank -> Int2,
        priority -> Int4,
        position -> Int8,
        status -> Text,
        required_labels -> Array<Text>,
        concurrency_key -> Nullable<Text>,
        concurrency_limit -> Nullable<Int4>,
        requires_approval -> Bool,
        payload -> Jsonb,
        metadata -> Jsonb,
        retry_policy -> Jsonb,
        schedule_to_start_ms -> Nullable<Int8>,
        run_timeout_ms -> Nullable<Int8>,
        deadline_at -> Nullable<Timestamptz>,
        run_at -> Timestamptz,
        lease_epoch -> Int8,
        app_failures -> Int4,
        infra_failures -> Int4,
        cancel_reason -> Nullable<Text>,
        agent_id -> Nullable<Uuid>,
        lease_expires_at -> Nullable<Timestamptz>,
        leased_at -> Nullable<Timestamptz>,
        started_at -> Nullable<Timestamptz>,
        run_deadline_at -> Nullable<Timestamptz>,
        cancel_requested_at -> Nullable<Timestamptz>,
        cancel_deadline_at -> Nullable<Timestamptz>,
        exit_code -> Nullable<Int4>,
        error_kind -> Nullable<Text>,
        error_message -> Nullable<Text>,
        created_by -> Nullable<Text>,
        request_id -> Nullable<Text>,
        created_at -> Timestamptz,
        queued_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        traceparent -> Nullable<Text>,
        tracestate -> Nullable<Text>,
    }
}

diesel::table! {
    attempts (job_id, epoch) {
        job_id -> Uuid,
        epoch -> Int8,
        attempt -> Int4,
        agent_id -> Uuid,
        leased_at -> Timestamptz,
        started_at -> Nullable<Timestamptz>,
        ended_at -> Timestamptz,
        outcome -> Text,
        exit_code -> Nullable<Int4>,
        error_kind -> Nullable<Text>,
        error_message -> Nullable<Text>,
    }
}

diesel::table! {
    concurrency_slots (org_id, key, slot) {
        org_id -> Text,
        key -> Text,
        slot -> Int4,
        job_id -> Uuid,
        epoch -> Int8,
    }
}

diesel::table! {
    job_logs (job_id, seq) {
        job_id -> Uuid,
        seq -> Int8,
        epoch -> Int8,
        stream -> Text,
        at -> Timestamptz,
        line -> Text,
    }
}

diesel::table! {
    job_log_heads (job_id) {
        job_id -> Uuid,
        next_seq -> Int8,
        epoch -> Int8,
        committed_offset -> Int8,
    }
}

diesel::table! {
    approvals (id) {
        id -> Uuid,
        job_id -> Uuid,
        decision -> Text,
        decided_by -> Text,
        comment -> Nullable<Text>,
        decided_at -> Timestamptz,
    }
}

diesel::table! {
    idempotency_keys (org_id, key) {
        org_id -> Text,
        key -> Text,
        request_hash -> Bytea,
        job_ids -> Array<Uuid>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    audit_events (id) {
        id -> Uuid,
        org_id -> Text,
        actor -> Text,
        action -> Text,
        target_type -> Text,
        target_id -> Text,
        request_id -> Nullable<Text>,
        details -> Jsonb,
        at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    orgs,
    org_settings,
    repositories,
    registration_tokens,
    agents,
    agent_credentials,
    jobs,
    attempts,
    concurrency_slots,
    job_logs,
    job_log_heads,
    approvals,
    idempotency_keys,
    audit_events
);

diesel::joinable!(agent_credentials -> agents (agent_id));
