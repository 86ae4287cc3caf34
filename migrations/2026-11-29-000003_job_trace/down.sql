ALTER TABLE jobs DROP COLUMN traceparent, DROP COLUMN tracestate;
