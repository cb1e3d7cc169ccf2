-- Chats and their messages, owned by (org_id, user_id).
CREATE TABLE chats (
    id            uuid PRIMARY KEY,
    org_id        text NOT NULL CHECK (length(org_id) BETWEEN 1 AND 200),
    user_id       text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    title         text CHECK (length(title) <= 200),
    model         text NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    system_prompt text CHECK (length(system_prompt) <= 20000),
    metadata      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);

-- A user's chats by recent activity, and their trash by deletion time.
CREATE INDEX chats_owner_active ON chats (org_id, user_id, updated_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX chats_owner_deleted ON chats (org_id, user_id, deleted_at DESC, id DESC) WHERE deleted_at IS NOT NULL;
-- Title search: full-text with the 'simple' configuration (no stemming, any language), word prefixes.
CREATE INDEX chats_title_search ON chats USING gin (to_tsvector('simple', COALESCE(title, '')));

CREATE TABLE messages (
    id            uuid PRIMARY KEY,
    seq           bigint GENERATED ALWAYS AS IDENTITY,
    chat_id       uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    org_id        text NOT NULL,
    user_id       text NOT NULL,
    role          text NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
    content       text NOT NULL DEFAULT '' CHECK (length(content) <= 2000000),
    parts         jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(parts) = 'array'),
    status        text NOT NULL DEFAULT 'complete'
                  CHECK (status IN ('streaming', 'complete', 'cancelled', 'error', 'interrupted')),
    finish_reason text CHECK (finish_reason IN ('stop', 'length', 'cancelled', 'client_disconnected', 'error',
                                                'content_filter', 'tool_calls', 'interrupted')),
    model         text CHECK (length(model) <= 200),
    input_tokens  integer CHECK (input_tokens >= 0),
    output_tokens integer CHECK (output_tokens >= 0),
    usage_estimated boolean NOT NULL DEFAULT false,
    client_message_id text CHECK (length(client_message_id) <= 200),
    metadata      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    deleted_at    timestamptz
);

-- Page a chat's messages in order.
CREATE INDEX messages_chat_seq ON messages (chat_id, seq);
-- Find replies left streaming by an instance that died.
CREATE INDEX messages_streaming ON messages (created_at) WHERE status = 'streaming';
-- Per-user totals for /v1/stats.
CREATE INDEX messages_owner ON messages (org_id, user_id) WHERE deleted_at IS NULL;
