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
                          charged_tokens, estimated, kind, reasoning_tokens)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: plan_for_the_values
-- In a transaction: its statements are planned for their parameters' values every time, never with the
-- generic plan a prepared statement may keep after five runs.
SET LOCAL plan_cache_mode = force_custom_plan;

-- name: usage_report_org_by_day
-- The usage report: the ledger rows of an org (or of one of its users, $4) from $2 up to $3 (exclusive),
-- summed by UTC day (a date), by model or by user, one plain query a grouping. The org's are read from
-- usage_ledger_org_time alone, a user's through usage_ledger_owner_time.
SELECT (created_at AT TIME ZONE 'UTC')::date AS key, sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens, coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
       sum(charged_tokens) AS charged_tokens, count(*) AS requests
FROM usage_ledger WHERE org_id = $1 AND created_at >= $2 AND created_at < $3
GROUP BY key ORDER BY key;

-- name: usage_report_org_by_model
SELECT model AS key, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens, sum(charged_tokens) AS charged_tokens,
       count(*) AS requests
FROM usage_ledger WHERE org_id = $1 AND created_at >= $2 AND created_at < $3
GROUP BY model ORDER BY key;

-- name: usage_report_org_by_user
SELECT user_id AS key, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens, sum(charged_tokens) AS charged_tokens,
       count(*) AS requests
FROM usage_ledger WHERE org_id = $1 AND created_at >= $2 AND created_at < $3
GROUP BY user_id ORDER BY key;

-- name: usage_report_user_by_day
SELECT (created_at AT TIME ZONE 'UTC')::date AS key, sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens, coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
       sum(charged_tokens) AS charged_tokens, count(*) AS requests
FROM usage_ledger WHERE org_id = $1 AND user_id = $4 AND created_at >= $2 AND created_at < $3
GROUP BY key ORDER BY key;

-- name: usage_report_user_by_model
SELECT model AS key, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens, sum(charged_tokens) AS charged_tokens,
       count(*) AS requests
FROM usage_ledger WHERE org_id = $1 AND user_id = $4 AND created_at >= $2 AND created_at < $3
GROUP BY model ORDER BY key;

-- name: usage_report_user_by_user
SELECT user_id AS key, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens, sum(charged_tokens) AS charged_tokens,
       count(*) AS requests
FROM usage_ledger WHERE org_id = $1 AND user_id = $4 AND created_at >= $2 AND created_at < $3
GROUP BY user_id ORDER BY key;
