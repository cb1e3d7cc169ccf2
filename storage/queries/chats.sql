-- name: lock_owner
-- Serialises chat creation per owner while a chat cap is enforced.
SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0));

-- name: count_active_chats
SELECT count(*) FROM chats WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL;

-- name: insert_chat
INSERT INTO chats (id, org_id, user_id, title, model, system_prompt, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, title, model, system_prompt, metadata, created_at, updated_at, deleted_at;

-- name: get_chat
SELECT id, title, model, system_prompt, metadata, created_at, updated_at, deleted_at
FROM chats
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL;

-- name: list_active_chats
SELECT id, title, model, system_prompt, metadata, created_at, updated_at, deleted_at,
       count(*) OVER () AS total
FROM chats
WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL
  AND ($3::text IS NULL OR to_tsvector('simple', COALESCE(title, '')) @@ to_tsquery('simple', $3))
ORDER BY updated_at DESC, id DESC
LIMIT $4 OFFSET $5;

-- name: list_deleted_chats
SELECT id, title, model, system_prompt, metadata, created_at, updated_at, deleted_at,
       count(*) OVER () AS total
FROM chats
WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NOT NULL
  AND ($3::text IS NULL OR to_tsvector('simple', COALESCE(title, '')) @@ to_tsquery('simple', $3))
ORDER BY deleted_at DESC, id DESC
LIMIT $4 OFFSET $5;

-- name: count_active_matching
SELECT count(*) FROM chats
WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NULL AND ($3::text IS NULL OR to_tsvector('simple', COALESCE(title, '')) @@ to_tsquery('simple', $3));

-- name: count_deleted_matching
SELECT count(*) FROM chats
WHERE org_id = $1 AND user_id = $2 AND deleted_at IS NOT NULL AND ($3::text IS NULL OR to_tsvector('simple', COALESCE(title, '')) @@ to_tsquery('simple', $3));

-- name: update_chat
-- Each field is set only when its flag says the client sent it, so null can clear a field.
UPDATE chats SET
    title         = CASE WHEN $4 THEN $5 ELSE title END,
    model         = CASE WHEN $6 THEN $7 ELSE model END,
    system_prompt = CASE WHEN $8 THEN $9 ELSE system_prompt END,
    metadata      = CASE WHEN $10 THEN $11 ELSE metadata END,
    updated_at    = now()
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
RETURNING id, title, model, system_prompt, metadata, created_at, updated_at, deleted_at;

-- name: soft_delete_chat
-- The chat's live messages take the chat's deletion time, so a restore brings back exactly those.
WITH chat AS (
    UPDATE chats SET deleted_at = now()
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
RETURNING c.id, c.title, c.model, c.system_prompt, c.metadata, c.created_at, c.updated_at, c.deleted_at;

-- name: erase_chat
DELETE FROM chats WHERE id = $1 AND org_id = $2 AND user_id = $3 RETURNING id;

-- name: erase_org
-- Every chat of an org (its messages go with them) and its usage ledger.
WITH ledger AS (DELETE FROM usage_ledger WHERE org_id = $1)
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
