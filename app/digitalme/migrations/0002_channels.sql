-- The durable inbox: every verified webhook delivery, stored before it is acknowledged and
-- processed later by the background worker. A platform's redelivery carries the same
-- delivery id, so it hits the UNIQUE constraint and is a no-op.
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,               -- telegram, slack, github, clickup
    delivery_id TEXT NOT NULL,           -- the platform's own id (update_id, event_id, ...)
    kind TEXT NOT NULL,                  -- what the delivery is (message, command, event name)
    payload TEXT NOT NULL,               -- the delivery as JSON
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'done', 'failed', 'ignored')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,       -- unix seconds; due when <= now
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_error TEXT,
    -- Progress, so a retry after a crash or an outage never asks Claude twice or sends twice:
    user_message_id INTEGER REFERENCES messages (id),   -- the incoming text, once stored
    reply_message_id INTEGER REFERENCES messages (id),  -- Claude's answer, once stored
    parts_sent INTEGER NOT NULL DEFAULT 0,              -- reply parts the platform accepted
    result TEXT,                                        -- what was done (e.g. sent message id)
    UNIQUE (channel, delivery_id)
);
CREATE INDEX inbox_due ON inbox (status, next_attempt_at);

-- The owner's recent activity (GitHub and ClickUp events), summarised into each Claude call.
CREATE TABLE activity (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,                -- github, clickup
    inbox_id INTEGER NOT NULL UNIQUE REFERENCES inbox (id),
    kind TEXT NOT NULL,                  -- e.g. issues.opened, push, taskCreated
    actor TEXT,
    summary TEXT NOT NULL,
    url TEXT,
    occurred_at TEXT NOT NULL
);
CREATE INDEX activity_by_time ON activity (occurred_at);

-- What the clone's tools did, for per-day limits and to not repeat an action when a turn
-- is retried (e.g. a ClickUp task created once per conversation and request).
CREATE TABLE tool_actions (
    id INTEGER PRIMARY KEY,
    tool TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX tool_actions_by_day ON tool_actions (tool, created_at);
