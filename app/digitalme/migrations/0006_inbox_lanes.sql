-- The conversation each delivery belongs to (a Telegram chat, a Slack thread, a GitHub
-- issue: the channel's lane, "<channel>:<key>"), stored when it is received, so that a
-- claim, on any host sharing the database, takes a conversation's deliveries one at a time
-- and in order (InboxStore.claim). Earlier rows have none: each is a conversation of its own.
ALTER TABLE inbox ADD COLUMN lane TEXT;
-- A claim asks whether an earlier delivery of the same conversation is still open: only
-- unfinished rows are indexed, so the question reads those alone, however long the
-- conversation's history.
CREATE INDEX inbox_open_lanes ON inbox (lane, id) WHERE status IN ('pending', 'processing');
