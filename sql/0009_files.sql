-- Files a user uploaded (POST /v1/files), owned by (org_id, user_id) like chats, for messages to attach.
--
-- A file's bytes are rows of file_chunks, each at most 1 MiB (storage/files.py), not one bytea: asyncpg
-- copies a parameter whole into its message buffer, so inserting a 20 MiB file as one bytea took the
-- worker 40 MiB beyond the file's own bytes (measured: peak resident memory), and in 1 MiB chunks 1.8 MiB.
-- A download, likewise, holds one chunk at a time.
CREATE TABLE files (
    id         uuid PRIMARY KEY,
    org_id     text NOT NULL CHECK (length(org_id) BETWEEN 1 AND 200),
    user_id    text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    media_type text NOT NULL CHECK (media_type IN ('image/png', 'image/jpeg', 'image/gif', 'image/webp',
                                                   'application/pdf', 'text/plain')),
    size       bigint NOT NULL CHECK (size > 0),
    sha256     text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A user's files, newest first (the listing and its cursor), and the sum of their sizes (the storage cap).
CREATE INDEX files_owner ON files (org_id, user_id, created_at DESC, id DESC) INCLUDE (size);

CREATE TABLE file_chunks (
    file_id uuid NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    seq     integer NOT NULL CHECK (seq >= 0),
    data    bytea NOT NULL CHECK (length(data) BETWEEN 1 AND 1048576),
    PRIMARY KEY (file_id, seq)
);
