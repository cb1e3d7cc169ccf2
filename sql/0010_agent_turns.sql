-- Agent turns: tools, tool results and reasoning on the chat path.
--
-- reasoning_tokens: of a reply's output_tokens, those the model spent reasoning; null when the provider did
-- not say. A chat's default tools (OpenAI function format), tool choice and reasoning effort, used by a send
-- that names none; null: none.
ALTER TABLE messages ADD COLUMN reasoning_tokens integer CHECK (reasoning_tokens >= 0);
ALTER TABLE chats
    ADD COLUMN tools jsonb CHECK (jsonb_typeof(tools) = 'array'),
    ADD COLUMN tool_choice jsonb CHECK (jsonb_typeof(tool_choice) IN ('string', 'object')),
    ADD COLUMN reasoning_effort text CHECK (reasoning_effort IN ('minimal', 'low', 'medium', 'high'));
