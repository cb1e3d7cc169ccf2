-- What each ledger row paid for: a chat turn or completion ('chat'), or a title a model wrote ('title').
ALTER TABLE usage_ledger ADD COLUMN kind text NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'title'));
