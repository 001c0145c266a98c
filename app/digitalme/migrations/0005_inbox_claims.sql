-- Several app processes on one database (PostgreSQL, docs/scale-out.md): which process
-- claimed a delivery, and which processes are alive, so that a process takes back only the
-- deliveries of processes that are gone (InboxStore.recover), never those another live
-- process is answering.
ALTER TABLE inbox ADD COLUMN claimed_by TEXT;
CREATE TABLE workers (
    id TEXT PRIMARY KEY,                 -- host:pid:random, new at every start
    started_at TEXT NOT NULL,
    seen_at REAL NOT NULL                -- unix seconds of its last heartbeat
);
