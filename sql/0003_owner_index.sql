-- The partial owner index (WHERE deleted_at IS NULL) matched every live-message predicate, so the planner
-- could AND it into a chat's history read and walk all of the owner's messages (2.9 ms for a 20-row read
-- of an owner with 58,000 messages). Without the predicate only per-owner queries (stats) can use it.
DROP INDEX messages_owner;
CREATE INDEX messages_owner ON messages (org_id, user_id);
