// Resumes a Streamgate UI chat turn through the AI SDK's own resume path. A Chat (AbstractChat, what useChat
// wraps) with DefaultChatTransport sends with `on_disconnect: "continue"` in the transport's body and stops
// reading mid-answer (stop() only disconnects); then a new Chat for the same id, holding the messages the
// first one was left with (a reloaded page's), calls resumeStream() (useChat({resume: true}) on mount): the
// transport's reconnectToStream GETs /v1/ui/chat/{id}/stream, and the replay from the turn's start takes the
// place of the partial reply.
// Usage: node ui_resume.mjs <gateway> <token> <chatId> <resume|fresh> <model>
// resume prints {"stopped": text} once the first Chat stopped, {"resumed": text} when the resumed reply first
// shows text, then {message, messages, finish, requests}. fresh only resumes a chat never sent to, and prints
// {status, error, messages, requests}.
import { DefaultChatTransport } from "ai";
import { Chat, textOf } from "./chat.mjs";

const [gateway, token, chatId, mode, model] = process.argv.slice(2);
const requests = [];
const transport = new DefaultChatTransport({
  api: `${gateway}/v1/ui/chat`,
  headers: { Authorization: `Bearer ${token}` },
  body: { model, on_disconnect: "continue" },
  fetch: async (url, init) => {
    const response = await fetch(url, init);
    requests.push({ method: init.method, url: String(url), status: response.status, body: init.body && JSON.parse(init.body) });
    return response;
  },
});
const print = (value) => console.log(JSON.stringify(value));

if (mode === "fresh") {
  const chat = new Chat({ id: chatId, transport });
  await chat.resumeStream();
  print({ status: chat.status, error: chat.error?.message ?? null, messages: chat.messages, requests });
  process.exit(0);
}

let stopping;
const reading = new Chat({
  id: chatId,
  transport,
  onChange: (messages) => {
    const reply = messages.at(-1);
    if (reply.role === "assistant" && textOf(reply) && !stopping) stopping = reading.stop();
  },
});
await reading.sendMessage({ text: "pick this answer up again" });
await stopping;
print({ stopped: textOf(reading.lastMessage), status: reading.status });

let shown = false;
let finish;
const reloaded = new Chat({
  id: chatId,
  transport,
  messages: reading.messages,
  onChange: (messages) => {
    const reply = messages.at(-1);
    if (!shown && reply.role === "assistant" && reloaded.status === "streaming" && textOf(reply)) {
      shown = true;
      print({ resumed: textOf(reply) });
    }
  },
  onFinish: ({ finishReason, isAbort, isDisconnect, isError }) => { finish = { finishReason, isAbort, isDisconnect, isError }; },
});
await reloaded.resumeStream();
print({ message: reloaded.lastMessage, messages: reloaded.messages, status: reloaded.status,
        error: reloaded.error?.message ?? null, finish, requests });
