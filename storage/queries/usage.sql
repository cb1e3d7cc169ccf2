-- name: get_quota_override
SELECT tokens_per_period, period, requests_per_minute, max_concurrent_streams, updated_at
FROM quota_overrides WHERE org_id = $1 AND scope = $2 AND subject_id = $3;

-- name: put_quota_override
INSERT INTO quota_overrides (org_id, scope, subject_id, tokens_per_period, period, requests_per_minute,
                             max_concurrent_streams)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (org_id, scope, subject_id) DO UPDATE SET
    tokens_per_period = EXCLUDED.tokens_per_period, period = EXCLUDED.period,
    requests_per_minute = EXCLUDED.requests_per_minute,
    max_concurrent_streams = EXCLUDED.max_concurrent_streams, updated_at = now()
RETURNING tokens_per_period, period, requests_per_minute, max_concurrent_streams, updated_at;

-- name: insert_usage
INSERT INTO usage_ledger (org_id, user_id, chat_id, message_id, model, input_tokens, output_tokens,
                          charged_tokens, estimated, kind)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);
