-- name: list_messages_asc
SELECT id, chat_id, role, content, parts, status, finish_reason, model, input_tokens, output_tokens,
       usage_estimated, reasoning_tokens, metadata, created_at, completed_at, count(*) OVER () AS total
FROM messages
WHERE chat_id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
ORDER BY seq ASC
LIMIT $4 OFFSET $5;

-- name: list_messages_desc
SELECT id, chat_id, role, content, parts, status, finish_reason, model, input_tokens, output_tokens,
       usage_estimated, reasoning_tokens, metadata, created_at, completed_at, count(*) OVER () AS total
FROM messages
WHERE chat_id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
ORDER BY seq DESC
LIMIT $4 OFFSET $5;

-- name: count_messages
SELECT count(*) FROM messages
WHERE chat_id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL;

-- name: get_message
SELECT id, chat_id, role, content, parts, status, finish_reason, model, input_tokens, output_tokens,
       usage_estimated, reasoning_tokens, metadata, created_at, completed_at
FROM messages
WHERE id = $1 AND org_id = $2 AND user_id = $3;

-- name: chat_for_turn
-- The chat and its most recent messages (newest first, as arrays: building a JSON document of them cost
-- a third more), in one round trip before a turn. A user's message's parts come only when it has more
-- than its text (attachments), else NULL; a reply's and a tool message's always (reasoning, tool calls,
-- tool results). History is the user's messages, the replies with text or tool calls, and the tool
-- results; with each, its model (reasoning goes back only to the provider that made it). The chat's
-- default tools and effort come too. {history_messages} is written in once (see storage/messages.py): as a
-- parameter, it would have the read planned anew on every call. duplicate: the chat already holds a
-- message with the client's id $4 (never, when $4 is NULL). $5 is the turn's own message, left out of
-- both: its write may be done before this read (gateway/api/send.py).
SELECT c.id, c.title, c.model, c.system_prompt, c.tools, c.tool_choice, c.reasoning_effort, h.roles,
       h.contents, h.parts, h.models,
       EXISTS (SELECT 1 FROM messages d
               WHERE d.chat_id = c.id AND d.client_message_id = $4 AND d.id IS DISTINCT FROM $5) AS duplicate
FROM chats c,
     LATERAL (SELECT array_agg(m.role) AS roles, array_agg(m.content) AS contents, array_agg(m.parts) AS parts,
                     array_agg(m.model) AS models
              FROM (SELECT role, content, model,
                           CASE WHEN role <> 'user' OR jsonb_array_length(parts) > 1 THEN parts END AS parts
                    FROM messages
                    WHERE chat_id = c.id AND deleted_at IS NULL AND role IN ('user', 'assistant', 'tool')
                      AND (content <> '' OR role = 'tool' OR parts @> '[{"type": "tool-call"}]')
                      AND id IS DISTINCT FROM $5
                    ORDER BY seq DESC LIMIT {history_messages}) m) h
WHERE c.id = $1 AND c.org_id = $2 AND c.user_id = $3 AND c.deleted_at IS NULL;

-- name: client_message
-- The message a client's id names in a chat, and the reply stored right after it (a turn's two rows).
SELECT u.id AS user_message_id,
       (SELECT a.id FROM messages a WHERE a.chat_id = u.chat_id AND a.seq > u.seq AND a.role = 'assistant'
        ORDER BY a.seq LIMIT 1) AS assistant_message_id
FROM messages u
WHERE u.chat_id = $1 AND u.client_message_id = $2 AND u.org_id = $3 AND u.user_id = $4;

-- name: insert_turn
-- The user's message ($12: its role, user or tool) (complete) and the assistant's reply (streaming, empty)
-- in one statement, which also
-- moves the chat's activity time and titles an untitled chat. Rows are inserted in VALUES order, so the
-- reply's seq follows the message's. It answers with the chat's activity time and title as they were
-- (what unstore_turn puts back), and with no row when the chat is gone.
WITH before AS (
    SELECT updated_at, title FROM chats WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
), chat AS (
    UPDATE chats SET updated_at = now(), title = COALESCE(title, $6)
    WHERE id = $1 AND org_id = $2 AND user_id = $3 AND deleted_at IS NULL
    RETURNING id
), added AS (
    INSERT INTO messages (id, chat_id, org_id, user_id, role, content, parts, status, model,
                          client_message_id, metadata, completed_at)
    SELECT v.id, chat.id, $2, $3, v.role, v.content, v.parts, v.status, v.model, v.client_message_id,
           v.metadata, v.completed_at
    FROM chat, (VALUES
        ($4::uuid, $12::text, $7::text, $8::jsonb, 'complete', NULL::text, $9::text, $10::jsonb, now()),
        ($5::uuid, 'assistant', '', '[]'::jsonb, 'streaming', $11::text, NULL, '{}'::jsonb, NULL::timestamptz)
    ) AS v(id, role, content, parts, status, model, client_message_id, metadata, completed_at)
    RETURNING id
)
SELECT updated_at, title FROM before WHERE (SELECT count(*) FROM added) = 2;

-- name: unstore_turn
-- A stored turn taken back before it started (see gateway/api/send.py): its two messages deleted, and the
-- chat's activity time and title put back ($6, $7), unless something has moved the chat since.
WITH gone AS (
    DELETE FROM messages WHERE id IN ($4, $5) AND chat_id = $1 AND org_id = $2 AND user_id = $3
    RETURNING created_at
)
UPDATE chats SET updated_at = $6, title = $7
WHERE id = $1 AND org_id = $2 AND user_id = $3 AND updated_at = (SELECT max(created_at) FROM gone);

-- name: finish_message
-- The reply's final state and its usage ledger row, in one statement; once only (a write retried after
-- an outage, or made again from the turn's kept events, finds the reply no longer streaming).
WITH reply AS (
    UPDATE messages SET
        content = $2, status = $3, finish_reason = $4, model = $5,
        input_tokens = $6, output_tokens = $7, usage_estimated = $8,
        metadata = metadata || $9::jsonb, completed_at = now(), parts = COALESCE($11::jsonb, parts),
        reasoning_tokens = $12
    WHERE id = $1 AND status = 'streaming'
    RETURNING org_id, user_id, chat_id
)
INSERT INTO usage_ledger (org_id, user_id, chat_id, message_id, model, input_tokens, output_tokens,
                          charged_tokens, estimated, reasoning_tokens)
SELECT org_id, user_id, chat_id, $1, $5, $6, $7, $10, $8, $12 FROM reply;

-- name: checkpoint_messages
-- Appends what each reply streamed since its last checkpoint (a long reply is not rewritten whole), and
-- writes the parts of one with reasoning or tool calls (NULL: none).
UPDATE messages m SET content = m.content || v.delta, parts = COALESCE(v.parts::jsonb, m.parts)
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS v(id, delta, parts)
WHERE m.id = v.id AND m.status = 'streaming';

-- name: streaming_messages
SELECT id, chat_id, org_id FROM messages WHERE status = 'streaming' AND created_at < now() - make_interval(secs => $1);

-- name: interrupt_messages
UPDATE messages SET status = 'interrupted', finish_reason = 'interrupted', completed_at = now()
WHERE id = ANY($1::uuid[]) AND status = 'streaming';

-- name: interrupt_message_kept
-- A reply whose instance died, with the text its kept events hold when that is no less than its last
-- checkpoint's (and their parts with it).
UPDATE messages SET status = 'interrupted', finish_reason = 'interrupted', completed_at = now(),
    content = CASE WHEN length($2) >= length(content) THEN $2 ELSE content END,
    parts = CASE WHEN length($2) >= length(content) THEN COALESCE($3::jsonb, parts) ELSE parts END
WHERE id = $1 AND status = 'streaming';

-- name: shared_chat
-- A share link's chat: its title and its live messages in order, one row a message (one row with a NULL
-- role for a chat without messages, none for a link that is unknown or dead). A chat holds a share_id only
-- while it is public and not deleted (the check chats_share_only_public), so the id alone decides; asking
-- for visibility and deleted_at here too let the planner walk chats_org_shared instead of chats_share_id.
-- One statement, so the link's check and the messages are of one moment.
SELECT c.title, m.role, m.content, m.parts, m.created_at
FROM chats c
LEFT JOIN messages m ON m.chat_id = c.id AND m.deleted_at IS NULL
WHERE c.share_id = $1
ORDER BY m.seq;
