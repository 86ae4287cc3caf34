DROP INDEX IF EXISTS jobs_ready_group, jobs_ready_group_oldest, jobs_leased_org, jobs_cancel_deadline,
    jobs_run_deadline, jobs_overall_deadline, jobs_schedule_to_start;
