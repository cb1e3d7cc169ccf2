-- name: lock_file_owner
-- Serialises a user's uploads while the storage cap is enforced: two at once cannot both fit under it.
SELECT pg_advisory_xact_lock(hashtextextended('files/' || $1 || '/' || $2, 0));

-- name: stored_bytes
SELECT COALESCE(sum(size), 0) FROM files WHERE org_id = $1 AND user_id = $2;

-- name: insert_file
INSERT INTO files (id, org_id, user_id, name, media_type, size, sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, name, media_type, size, sha256, created_at;

-- name: insert_file_chunk
INSERT INTO file_chunks (file_id, seq, data) VALUES ($1, $2, $3);

-- name: get_file
SELECT id, name, media_type, size, sha256, created_at
FROM files
WHERE id = $1 AND org_id = $2 AND user_id = $3;

-- name: list_files
-- A page of the user's files, newest first; after the file ($4, $5) when a cursor names one.
SELECT id, name, media_type, size, sha256, created_at
FROM files
WHERE org_id = $1 AND user_id = $2
  AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $3 OFFSET $6;

-- name: count_files
SELECT count(*) FROM files WHERE org_id = $1 AND user_id = $2;

-- name: delete_file
DELETE FROM files WHERE id = $1 AND org_id = $2 AND user_id = $3;

-- name: file_chunk
-- One chunk of a file being downloaded (its owner was checked when the download began).
SELECT data FROM file_chunks WHERE file_id = $1 AND seq = $2;

-- name: files_for_model
-- The user's files of $1 (ids, in the order of preference) with their bytes, while their sizes summed in
-- that order stay within $4 bytes; past it a file comes without its bytes (data NULL). A file that is
-- not the user's, or no longer exists, has no row.
WITH wanted AS (
    SELECT id, name, media_type, size,
           sum(size) OVER (ORDER BY array_position($1::uuid[], id)) AS running
    FROM files
    WHERE id = ANY($1::uuid[]) AND org_id = $2 AND user_id = $3
)
SELECT w.id, w.name, w.media_type, w.size,
       CASE WHEN w.running <= $4 THEN
           (SELECT string_agg(c.data, ''::bytea ORDER BY c.seq) FROM file_chunks c WHERE c.file_id = w.id)
       END AS data
FROM wanted w;
