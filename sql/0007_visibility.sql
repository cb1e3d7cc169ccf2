-- Who may read a chat besides its owner: 'private' (nobody), 'org' (members of its org), 'public' (also
-- anyone holding its share link). share_id is the link: a random id, never the chat's, that lives only
-- while the chat is public and not deleted; cleared, it is never reused (a dead link stays dead).
ALTER TABLE chats
    ADD COLUMN visibility text NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'org', 'public')),
    ADD COLUMN share_id text CHECK (length(share_id) BETWEEN 16 AND 64),
    ADD CONSTRAINT chats_share_only_public CHECK (share_id IS NULL OR (visibility = 'public' AND deleted_at IS NULL));

-- A share link's chat, from any instance.
CREATE UNIQUE INDEX chats_share_id ON chats (share_id) WHERE share_id IS NOT NULL;
-- An org's shared chats (scope=org) by recent activity; private chats, most of them, stay out of it.
CREATE INDEX chats_org_shared ON chats (org_id, updated_at DESC, id DESC)
    WHERE deleted_at IS NULL AND visibility <> 'private';
