-- Outbound idempotency (docs/channels.md): when the send of the next reply part (the one
-- after parts_sent) began, written and committed before the request goes out, cleared with
-- its outcome. Set on a delivery found after a crash: that part was in flight, and the
-- platform may or may not have it; the next attempt asks it where it can.
ALTER TABLE inbox ADD COLUMN sending_since REAL;
