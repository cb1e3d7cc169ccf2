-- A reply is bounded by its max_tokens, not in characters, and a model's token can be long (300 tokens of
-- 10,000 characters each are 3,000,000): its length is not checked here, so whatever a user received is
-- stored, up to PostgreSQL's own bound on a text (1 GB). What a client writes is bounded where the gateway
-- receives it (GATEWAY_MAX_MESSAGE_CHARS, the tool results' limits).
ALTER TABLE messages DROP CONSTRAINT messages_content_check;
