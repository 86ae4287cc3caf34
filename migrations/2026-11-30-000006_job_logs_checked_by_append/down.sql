DROP TRIGGER jobs_delete_logs ON jobs;
DROP FUNCTION delete_logs_of_deleted_jobs();
ALTER TABLE job_logs ADD CONSTRAINT job_logs_job_id_fkey
    FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE;
