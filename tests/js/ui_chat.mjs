// Drives Streamgate's UI message stream endpoint with the AI SDK's DefaultChatTransport and reads the reply
// with readUIMessageStream, as useChat does. Usage: node ui_chat.mjs <gateway> <token> <chatId> <full|abort> <model>
// Prints one JSON line: the final assistant UI message and the chunk types seen.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [gateway, token, chatId, mode, model] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: `${gateway}/v1/ui/chat`,
  headers: { Authorization: `Bearer ${token}` },
  body: { model },
});
const controller = new AbortController();
const stream = await transport.sendMessages({
  chatId,
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: controller.signal,
  messages: [{ id: "m1", role: "user", parts: [{ type: "text", text: "stream me some words please" }] }],
});

const seen = [];
const [forTypes, forMessage] = stream.tee();
const counting = (async () => {
  const reader = forTypes.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      seen.push(value.type);
      if (mode === "abort" && seen.filter((t) => t === "text-delta").length === 3) controller.abort();
    }
  } catch (error) {
    if (error.name !== "AbortError") throw error;
  }
})();

let last;
try {
  for await (const message of readUIMessageStream({ stream: forMessage })) last = message;
} catch (error) {
  if (error.name !== "AbortError") throw error;
}
await counting;
console.log(JSON.stringify({ message: last, types: seen }));
