DROP TRIGGER jobs_delete_history ON jobs;
DROP FUNCTION delete_history_of_deleted_jobs();
ALTER TABLE job_logs ADD CONSTRAINT job_logs_job_id_fkey
    FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE;
ALTER TABLE attempts ADD CONSTRAINT attempts_job_id_fkey
    FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE;
