// The Streamgate demo page: a token, the caller's chats, and replies streamed over fetch.
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("streamgate-token") || "", chatId: null, chat: null, abort: null, trash: false };

function headers(extra = {}) {
  return { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json", ...extra };
}

function describe(status, body) {
  const message = body?.error?.message || "";
  if (status === 401) return "Your token is missing, invalid or expired. Paste a new one.";
  if (status === 429) return `Slow down: ${message}.`;
  if (status >= 500) return `The gateway or the model provider failed (${status}): ${message}`;
  return message || `Request failed (${status})`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(describe(response.status, body));
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function refreshUsage() {
  try {
    const usage = await api("/v1/usage");
    const tokens = usage.user_tokens;
    $("usage").textContent = tokens.limit === null
      ? `${tokens.used} tokens used this ${tokens.period}`
      : `${tokens.used} of ${tokens.limit} tokens used this ${tokens.period}`;
  } catch (error) { $("usage").textContent = ""; }
}

async function loadChats() {
  if (!state.token) return;
  try {
    const page = await api(`/v1/chats?limit=100&deleted=${state.trash}`);
    const list = $("chat-list");
    list.replaceChildren(...page.items.map((chat) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = chat.title || "Untitled chat";
      button.setAttribute("aria-current", String(chat.id === state.chatId));
      button.addEventListener("click", () => openChat(chat.id));
      item.append(button);
      return item;
    }));
    if ($("status").classList.contains("error")) setStatus("");  // a stale error; "Stopped." stays
  } catch (error) { setStatus(error.message, true); }
  refreshUsage();
}

function renderMessage(message) {
  const item = document.createElement("li");
  item.className = message.role;
  item.dataset.id = message.id || "";
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.content;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = message.role === "assistant" ? `${message.status || ""} ${message.finish_reason || ""}` : "";
  item.append(text, meta);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function openChat(id) {
  state.chatId = id;
  try {
    const query = state.trash ? "" : "?message_limit=200";
    const chat = state.trash
      ? (await api(`/v1/chats?deleted=true&limit=100`)).items.find((c) => c.id === id)
      : await api(`/v1/chats/${id}${query}`);
    state.chat = chat;
    $("chat-title").textContent = chat.title || "Untitled chat";
    $("messages").replaceChildren();
    (chat.messages || []).forEach(renderMessage);
    $("rename").disabled = state.trash;
    $("delete").disabled = state.trash;
    $("restore").hidden = !state.trash;
  } catch (error) { setStatus(error.message, true); }
  loadChats();
}

async function readStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

async function send(event) {
  event.preventDefault();
  const content = $("message").value.trim();
  if (!content || !state.token) return;
  const model = $("model").value.trim();
  const body = state.chatId ? { content } : { message: content };
  if (model) body.model = model;
  const path = state.chatId ? `/v1/chats/${state.chatId}/messages` : "/v1/chat";
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("Waiting for the model…");
  renderMessage({ role: "user", content });
  $("message").value = "";
  let reply = null;
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.abort.signal });
    if (!response.ok) {
      const failure = await response.json().catch(() => null);
      throw new Error(describe(response.status, failure));
    }
    await readStream(response, (name, data) => {
      if (name === "start") {
        if (state.chatId !== data.chat_id) {
          state.chatId = data.chat_id;
          $("chat-title").textContent = content.slice(0, 80);
          $("rename").disabled = $("delete").disabled = false;
        }
        reply = renderMessage({ role: "assistant", content: "", id: data.assistant_message_id });
        setStatus("Streaming…");
      } else if (name === "delta") {
        reply.querySelector(".text").textContent += data.text;
      } else if (name === "done") {
        reply.querySelector(".meta").textContent = `${data.finish_reason} · ${data.usage.total_tokens} tokens · ${Math.round(data.duration_ms)} ms`;
        reply.dataset.finishReason = data.finish_reason;
        setStatus(data.finish_reason === "cancelled" ? "Stopped." : "");
      } else if (name === "error") {
        setStatus(`The model failed: ${data.message}`, true);
      }
    });
  } catch (error) {
    if (error.name !== "AbortError") setStatus(error.message, true);
  } finally {
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    loadChats();
  }
}

async function stop() {
  // The stop endpoint stops the stream wherever it runs and keeps the partial reply as cancelled; the
  // stream then ends with `done`. If nothing runs there any more, just drop the connection.
  $("stop").disabled = true;
  try {
    await api(`/v1/chats/${state.chatId}/stop`, { method: "POST" });
  } catch (error) {
    state.abort?.abort();
  }
}

async function devToken() {
  const response = await fetch("/dev/token", { method: "POST" });
  if (!response.ok) { setStatus("Dev tokens are only available in development mode.", true); return; }
  useToken((await response.json()).token);
}

function useToken(token) {
  state.token = token.trim();
  sessionStorage.setItem("streamgate-token", state.token);
  $("token").value = state.token;
  loadChats();
}

$("token-form").addEventListener("submit", (event) => { event.preventDefault(); useToken($("token").value); });
$("dev-token").addEventListener("click", devToken);
$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", () => {
  state.chatId = null; $("messages").replaceChildren(); $("chat-title").textContent = "New chat";
});
$("show-trash").addEventListener("change", (event) => { state.trash = event.target.checked; loadChats(); });
$("rename").addEventListener("click", async () => {
  const title = prompt("New title", state.chat?.title || "");
  if (!title) return;
  try { await api(`/v1/chats/${state.chatId}`, { method: "PATCH", body: JSON.stringify({ title }) }); openChat(state.chatId); }
  catch (error) { setStatus(error.message, true); }
});
$("delete").addEventListener("click", async () => {
  try { await api(`/v1/chats/${state.chatId}`, { method: "DELETE" }); state.chatId = null; $("messages").replaceChildren(); loadChats(); }
  catch (error) { setStatus(error.message, true); }
});
$("restore").addEventListener("click", async () => {
  try { await api(`/v1/chats/${state.chatId}/restore`, { method: "POST" }); $("show-trash").checked = false; state.trash = false; openChat(state.chatId); }
  catch (error) { setStatus(error.message, true); }
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});

fetch("/dev/token", { method: "HEAD" }).then((r) => { $("dev-token").hidden = !r.ok; });
if (state.token) { $("token").value = state.token; loadChats(); }
