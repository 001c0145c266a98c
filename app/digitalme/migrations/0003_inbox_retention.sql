-- Retention (digitalme/retention.py): finished deliveries are found by status and by when
-- they finished, oldest first, without reading the rest of the inbox.
CREATE INDEX inbox_finished ON inbox (status, updated_at);
