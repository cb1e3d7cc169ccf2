-- name: lock_owner
-- Serialises chat creation per owner while a chat cap is enforced.
SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0));

-- name: count_active_chats
SELECT count(*) FROM chats WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL;

-- name: insert_chat
INSERT INTO chats (id, org_id, user_id, title, model, system_prompt, metadata, visibility)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id, title, model, system_prompt, metadata, visibility, share_id, created_at, updated_at, deleted_at;

-- name: get_chat
SELECT id, title, model, system_prompt, metadata, visibility, share_id, created_at, updated_at, deleted_at,
       tools, tool_choice, reasoning_effort
FROM chats
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL;

-- name: list_chats
-- The listing (GET /v1/chats). list_chats and list_chats_after are templates with three placeholders in
-- braces, which storage/chats.py fills in once for each kind of listing: chats, whose chats it holds (one of
-- the chats_* conditions below); key, its order (updated_at, or deleted_at for the trash); and filters
-- (chat_list_filters). Parameters: $1 org, $2 the reader, $3 title search (a tsquery), $4 model, $5 created after,
-- $6 created before, $7 updated after, $8 updated before, $9 whether a reply streams (each null: any),
-- $10 the rows to read; then $11 the offset (list_chats), or the walk's snapshot, $12 and $13 the key and id
-- of its last chat listed (list_chats_after). The answer is one row with null chat fields when the page
-- holds no chat, so that it always carries the count of matches, read in the same snapshot as its chats.
--
-- A page by offset, with what a cursor from it carries: the statement's snapshot and time (a walk's start).
WITH matching AS (
    SELECT count(*) AS total FROM chats c WHERE {chats} AND {filters}
), page AS (
    SELECT c.id, c.user_id, c.title, c.model, c.system_prompt, c.metadata, c.visibility, c.share_id,
           c.created_at, c.updated_at, c.deleted_at, c.{key} AS walk_key
    FROM chats c
    WHERE {chats} AND {filters}
    ORDER BY c.{key} DESC, c.id DESC
    LIMIT $10 OFFSET $11
)
SELECT page.*, page.user_id = $2 AS owned, matching.total, pg_current_snapshot()::text AS snapshot,
       now() AS walk_started
FROM matching LEFT JOIN page ON true
ORDER BY page.walk_key DESC, page.id DESC;

-- name: list_chats_after
-- The page after ($12, $13) of a walk in the order its first page saw, in snapshot $11 (docs/api.md). Chats
-- that writes since then moved (moved: each chat's first such move holds the keys the walk saw) are put back
-- at those keys; every other chat is where it was, and its page is read from the listing's index.
WITH matching AS (
    SELECT count(*) AS total FROM chats c WHERE {chats} AND {filters}
), moved AS (
    SELECT DISTINCT ON (chat_id) chat_id, prior_updated_at AS updated_at, prior_deleted_at AS deleted_at
    FROM chat_moves
    WHERE org_id = $1 AND xid >= pg_snapshot_xmin($11::text::pg_snapshot)
      AND NOT pg_visible_in_snapshot(xid, $11::text::pg_snapshot)
    ORDER BY chat_id, id
), page AS (
    (SELECT c.id, c.user_id, c.title, c.model, c.system_prompt, c.metadata, c.visibility, c.share_id,
            c.created_at, c.updated_at, c.deleted_at, c.{key} AS walk_key
     FROM chats c
     WHERE {chats} AND {filters} AND (c.{key}, c.id) < ($12, $13) AND c.id NOT IN (SELECT chat_id FROM moved)
     ORDER BY c.{key} DESC, c.id DESC
     LIMIT $10)
    UNION ALL
    SELECT c.id, c.user_id, c.title, c.model, c.system_prompt, c.metadata, c.visibility, c.share_id,
           c.created_at, c.updated_at, c.deleted_at, moved.{key}
    FROM moved JOIN chats c ON c.id = moved.chat_id
    WHERE {chats} AND {filters} AND (moved.{key}, c.id) < ($12, $13)
    ORDER BY walk_key DESC, id DESC
    LIMIT $10
)
SELECT page.*, page.user_id = $2 AS owned, matching.total
FROM matching LEFT JOIN page ON true
ORDER BY page.walk_key DESC, page.id DESC;

-- name: chats_own_active
c.org_id = $1 AND c.user_id = $2 AND c.deleted_at IS NULL

-- name: chats_own_deleted
c.org_id = $1 AND c.user_id = $2 AND c.deleted_at IS NOT NULL

-- name: chats_own_all
c.org_id = $1 AND c.user_id = $2

-- name: chats_org
-- The org's shared chats (visibility org or public), any member's.
c.org_id = $1 AND c.deleted_at IS NULL AND c.visibility <> 'private'

-- name: chat_list_filters
($3::text IS NULL OR to_tsvector('simple', COALESCE(c.title, '')) @@ to_tsquery('simple', $3))
AND ($4::text IS NULL OR c.model = $4)
AND ($5::timestamptz IS NULL OR c.created_at > $5) AND ($6::timestamptz IS NULL OR c.created_at < $6)
AND ($7::timestamptz IS NULL OR c.updated_at > $7) AND ($8::timestamptz IS NULL OR c.updated_at < $8)
AND ($9::boolean IS NULL
     OR $9 = EXISTS (SELECT FROM messages m WHERE m.chat_id = c.id AND m.status = 'streaming'))

-- name: update_chat
-- Each field is set only when its flag says the client sent it, so null can clear a field. A chat made
-- private or org loses its share link for good.
UPDATE chats SET
    title         = CASE WHEN $4 THEN $5 ELSE title END,
    model         = CASE WHEN $6 THEN $7 ELSE model END,
    system_prompt = CASE WHEN $8 THEN $9 ELSE system_prompt END,
    metadata      = CASE WHEN $10 THEN $11 ELSE metadata END,
    visibility    = CASE WHEN $12 THEN $13 ELSE visibility END,
    share_id      = CASE WHEN $12 AND $13 <> 'public' THEN NULL ELSE share_id END,
    tools         = CASE WHEN $14 THEN $15::jsonb ELSE tools END,
    tool_choice   = CASE WHEN $16 THEN $17::jsonb ELSE tool_choice END,
    reasoning_effort = CASE WHEN $18 THEN $19 ELSE reasoning_effort END,
    updated_at    = now()
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
RETURNING id, title, model, system_prompt, metadata, visibility, share_id, created_at, updated_at, deleted_at,
          tools, tool_choice, reasoning_effort;

-- name: soft_delete_chat
-- The chat's live messages take the chat's deletion time, so a restore brings back exactly those. Its
-- share link dies with it: a restore does not bring it back.
WITH chat AS (
    UPDATE chats SET deleted_at = now(), share_id = NULL
    WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
    RETURNING id, deleted_at
), hidden AS (
    UPDATE messages m SET deleted_at = chat.deleted_at
    FROM chat WHERE m.chat_id = chat.id AND m.deleted_at IS NULL
)
SELECT id FROM chat;

-- name: restore_chat
WITH chat AS (
    SELECT id, deleted_at FROM chats
    WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NOT NULL
    FOR UPDATE
), shown AS (
    UPDATE messages m SET deleted_at = NULL
    FROM chat WHERE m.chat_id = chat.id AND m.deleted_at = chat.deleted_at
)
UPDATE chats c SET deleted_at = NULL
FROM chat WHERE c.id = chat.id
RETURNING c.id, c.title, c.model, c.system_prompt, c.metadata, c.visibility, c.share_id, c.created_at,
          c.updated_at, c.deleted_at;

-- name: get_readable_chat
-- A chat the reader ($2 org, $3 user) may read: their own, or another member's shared with the org.
SELECT id, user_id, title, model, system_prompt, metadata, visibility, share_id, created_at, updated_at, deleted_at,
       tools, tool_choice, reasoning_effort
FROM chats
WHERE id = $1 AND org_id = $2 AND deleted_at IS NULL AND (user_id = $3 OR visibility <> 'private');

-- name: share_chat
-- Makes the chat public and gives it the link $4, or keeps the link it has. Sharing is not activity:
-- updated_at stays.
UPDATE chats SET visibility = 'public', share_id = COALESCE(share_id, $4)
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
RETURNING share_id;

-- name: unshare_chat
-- The link dies; the chat stays public (readable by its org) until its visibility is changed.
UPDATE chats SET share_id = NULL
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
RETURNING id;

-- name: erase_chat
DELETE FROM chats WHERE id = $1 AND org_id = $2 AND user_id = $3 RETURNING id;

-- name: erase_empty_chat
-- A chat made for a first turn that was refused: taken back only while nothing was stored in it and it is
-- as it was made ($4, its updated_at then). A turn another request stores moves updated_at; a DELETE that
-- waited for that turn's commit checks the row as it committed, so it leaves that chat alone.
DELETE FROM chats WHERE id = $1 AND org_id = $2 AND user_id = $3 AND updated_at = $4
    AND NOT EXISTS (SELECT 1 FROM messages WHERE chat_id = $1) RETURNING id;

-- name: erase_org
-- Every chat of an org (its messages go with them), its files and its usage ledger.
WITH ledger AS (DELETE FROM usage_ledger WHERE org_id = $1),
     uploads AS (DELETE FROM files WHERE org_id = $1)
DELETE FROM chats WHERE org_id = $1;

-- name: owner_stats
SELECT
    (SELECT count(*) FROM chats WHERE org_id = $1 AND user_id = $2) AS total_chats,
    (SELECT count(*) FROM chats WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL) AS active_chats,
    (SELECT count(*) FROM chats WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NOT NULL) AS deleted_chats,
    count(*) AS total_messages,
    COALESCE(sum(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0) AS total_tokens
FROM messages
WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL;

-- name: set_model_title
-- A title a model wrote ($5) in place of the cut first message the chat was titled with ($4): a chat named
-- since (by PATCH) or deleted keeps what it has.
UPDATE chats SET title = $5, updated_at = now()
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL AND title = $4
RETURNING id;

-- name: prune_chat_moves
-- Moves older than any live cursor (sql/0011_chat_list.sql), a batch at a time.
DELETE FROM chat_moves WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM chat_moves WHERE moved_at < now() - interval '2 hours' LIMIT 5000));
