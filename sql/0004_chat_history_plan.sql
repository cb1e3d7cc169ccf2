-- A chat's history read (its newest messages, ORDER BY seq DESC LIMIT n) must stop at its limit. The planner
-- estimates rows per chat as rows / distinct chats: with most chats short, a long chat's read was planned as
-- fetch-everything-then-sort (1.6 ms for a 1,000-message chat against 0.1 ms walking messages_chat_seq
-- backwards, and growing with the chat). Telling it that a chat may hold a thousandth of all messages makes
-- the ordered index walk the plan for every chat; short chats read the same rows either way.
ALTER TABLE messages ALTER COLUMN chat_id SET (n_distinct = -0.001);
