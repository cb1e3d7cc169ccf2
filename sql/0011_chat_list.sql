-- The chat listing (GET /v1/chats, docs/api.md "Listing chats"): the indexes of its filters, and what a walk
-- with a cursor needs to list each chat once while chats change.

-- A user's chats are all in one org. Without this the planner multiplied the selectivities of org_id and
-- user_id and reckoned with 1 chat for a user of 18 (20,000 chats of 1,000 users in 50 orgs); at that
-- estimate it read a user's live chats through chats_owner_updated, filtering out the trash, rather than
-- through chats_owner_active.
CREATE STATISTICS chats_owner (dependencies) ON org_id, user_id FROM chats;

-- status=all: a user's chats, live and deleted, by recent activity. (Live ones alone are read through
-- chats_owner_active, the trash through chats_owner_deleted, an org's shared chats through chats_org_shared.)
CREATE INDEX chats_owner_updated ON chats (org_id, user_id, updated_at DESC, id DESC);

-- streaming=true|false: whether a chat has a reply streaming, one probe a chat. Only streaming replies are in
-- it, so it is as small as the replies running now (messages_chat_seq would read the chat's every message).
CREATE INDEX messages_streaming_chat ON messages (chat_id) WHERE status = 'streaming';

-- A walk lists the chats in the order its first page saw: a chat that a later write moved (a turn, a rename,
-- a delete or restore changes its updated_at or deleted_at) is listed at the place it had then. chat_moves
-- holds, for each such write, the chat's keys as they were before it and the writing transaction, so that a
-- later page can tell the writes its first page's snapshot did not see (pg_visible_in_snapshot) and put
-- those chats back where that page saw them. Writes to one chat hold its row lock, so its moves' ids are in
-- commit order: the first move a snapshot did not see holds the keys it saw.
-- A cursor lives an hour (gateway/api/cursors.py), a move two: the stream registry's maintenance deletes
-- expired moves (gateway/streaming/registry.py), and an erased chat takes its moves with it. (Pruning in
-- the trigger made every write slower as the table grew: 0.6 to 1.6 ms an update over 24,000 moves.)
CREATE TABLE chat_moves (
    id               bigint GENERATED ALWAYS AS IDENTITY,
    chat_id          uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    org_id           text NOT NULL,
    xid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    moved_at         timestamptz NOT NULL DEFAULT now(),
    prior_updated_at timestamptz NOT NULL,
    prior_deleted_at timestamptz,
    PRIMARY KEY (chat_id, id)
);
-- An org's moves since a walk began (xid at least its snapshot's xmin); the expired ones, to prune.
CREATE INDEX chat_moves_org_xid ON chat_moves (org_id, xid);
CREATE INDEX chat_moves_moved_at ON chat_moves (moved_at);

CREATE FUNCTION record_chat_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chat_moves (chat_id, org_id, prior_updated_at, prior_deleted_at)
    VALUES (OLD.id, OLD.org_id, OLD.updated_at, OLD.deleted_at);
    RETURN NEW;
END
$$;

CREATE TRIGGER chats_record_move BEFORE UPDATE ON chats FOR EACH ROW
    WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
    EXECUTE FUNCTION record_chat_move();
