-- The persona: one profile row and its weighted traits (replaced whole on import).
CREATE TABLE persona_profile (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    document TEXT NOT NULL,          -- the validated persona as canonical JSON
    source_sha256 TEXT NOT NULL,     -- of the imported file, to spot re-imports
    imported_at TEXT NOT NULL
);

CREATE TABLE persona_traits (
    id INTEGER PRIMARY KEY,
    position INTEGER NOT NULL,
    category TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    weight REAL NOT NULL CHECK (weight >= 0 AND weight <= 10),
    examples TEXT NOT NULL DEFAULT '[]'  -- JSON list of example phrases
);

-- Bearer tokens for the API and web chat; only a SHA-256 of each token is stored.
CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('chat', 'admin')),
    token_sha256 TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at TEXT
);

-- One conversation per (channel, external id): a Telegram chat, a Slack thread, an API
-- conversation. API conversations belong to the token that created them.
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    external_id TEXT NOT NULL,
    title TEXT,
    token_id INTEGER REFERENCES api_tokens (id),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (channel, external_id)
);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text TEXT NOT NULL,
    created_at TEXT NOT NULL,
    channel_message_id TEXT,         -- the platform's id of this message, when it has one
    model TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cache_read_tokens INTEGER,
    cache_write_tokens INTEGER,
    cost_usd REAL,
    stop_reason TEXT
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX messages_by_day ON messages (created_at) WHERE role = 'assistant';

-- Readiness proves the database writable by writing here.
CREATE TABLE health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
