-- A client's message id names one message of its chat, so a retried send is recognised rather than stored
-- twice. Before this rule a chat could hold the same id twice: the first message keeps it, later ones lose
-- it (their content and everything else stay).
UPDATE messages m SET client_message_id = NULL
WHERE m.client_message_id IS NOT NULL AND EXISTS (
    SELECT 1 FROM messages e
    WHERE e.chat_id = m.chat_id AND e.client_message_id = m.client_message_id AND e.seq < m.seq);
CREATE UNIQUE INDEX messages_client_id ON messages (chat_id, client_message_id) WHERE client_message_id IS NOT NULL;
