-- Per-subject quota overrides (null = the default from settings) and the durable usage ledger.
CREATE TABLE quota_overrides (
    org_id                 text NOT NULL,
    scope                  text NOT NULL CHECK (scope IN ('user', 'org')),
    subject_id             text NOT NULL CHECK (length(subject_id) BETWEEN 1 AND 200),
    tokens_per_period      bigint CHECK (tokens_per_period >= 0),
    period                 text NOT NULL DEFAULT 'day' CHECK (period IN ('day', 'month')),
    requests_per_minute    integer CHECK (requests_per_minute >= 0),
    max_concurrent_streams integer CHECK (max_concurrent_streams >= 0),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, scope, subject_id)
);

CREATE TABLE usage_ledger (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id        text NOT NULL,
    user_id       text NOT NULL,
    chat_id       uuid,
    message_id    uuid,
    model         text NOT NULL,
    input_tokens  integer NOT NULL CHECK (input_tokens >= 0),
    output_tokens integer NOT NULL CHECK (output_tokens >= 0),
    charged_tokens integer NOT NULL CHECK (charged_tokens >= 0),
    estimated     boolean NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_owner_time ON usage_ledger (org_id, user_id, created_at);
