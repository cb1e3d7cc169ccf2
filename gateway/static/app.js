// The Streamgate demo page: a token, the caller's chats, and replies streamed over fetch.
// Past 400 lines because the page is one script with no build step: chats, the composer, files, streaming and
// its resumes, each a few functions.
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("streamgate-token") || "", chatId: null, chat: null, abort: null, trash: false, attached: null };
// How long to wait before each try to pick up a stream the network dropped; then the page gives up.
const RETRY_MS = [250, 500, 1000, 2000, 4000, 8000];

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
  const files = (message.parts || []).filter((part) => part.type === "attachment").map((part) => `📎 ${part.name}`);
  meta.textContent = message.role === "assistant" ? `${message.status || ""} ${message.finish_reason || ""}` : files.join(" ");
  item.append(text, meta);
  if (message.role === "tool") return showResults(message);
  $("messages").append(item);
  (message.role === "assistant" ? message.parts || [] : []).forEach((part) => {
    if (part.type === "reasoning") reasoningOf(item).textContent += part.text;
    else if (part.type === "tool-call") toolCard(item, part.tool_call_id, part.tool_name).input.textContent = JSON.stringify(part.input);
  });
  item.scrollIntoView({ block: "end" });
  return item;
}

// A reply's reasoning, folded under its answer.
function reasoningOf(item) {
  let box = item.querySelector(".reasoning .thought");
  if (!box) {
    const details = document.createElement("details");
    details.className = "reasoning";
    details.innerHTML = "<summary>Reasoning</summary>";
    box = document.createElement("div");
    box.className = "thought";
    details.append(box);
    item.querySelector(".meta").before(details);
  }
  return box;
}

// A tool call as a card: its name, its input (its argument fragments while they stream), then its result.
function toolCard(item, id, name) {
  const card = document.createElement("div");
  card.className = "tool-card";
  card.dataset.callId = id;
  const title = document.createElement("strong");
  title.textContent = `🔧 ${name}`;
  const input = document.createElement("code");
  input.className = "input";
  const result = document.createElement("div");
  result.className = "result";
  card.append(title, input, result);
  item.querySelector(".meta").before(card);
  return { card, input, result };
}

function showResults(message) {
  for (const part of message.parts || []) {
    const card = document.querySelector(`.tool-card[data-call-id="${CSS.escape(part.tool_call_id)}"]`);
    if (card) card.querySelector(".result").textContent = `→ ${JSON.stringify(part.output)}`;
  }
  return null;
}

// The model waits for results: a field under each open call; sending them streams the next step.
function askResults(reply) {
  const cards = [...reply.querySelectorAll(".tool-card")].filter((card) => !card.querySelector(".result").textContent);
  if (!cards.length) return;
  const form = document.createElement("form");
  form.className = "results";
  form.innerHTML = '<input aria-label="Tool result" placeholder="the result, as JSON or text"><button type="submit">Send result</button>';
  cards.at(-1).append(form);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = form.querySelector("input").value.trim();
    let output = text;
    try { output = JSON.parse(text); } catch (error) { /* a plain string */ }
    form.remove();
    const results = cards.map((card) => ({ tool_call_id: card.dataset.callId, output }));
    showResults({ parts: results });
    stream(`/v1/chats/${state.chatId}/messages`, agentOptions({ tool_results: results }), "");
  });
}

const WEATHER_TOOL = { type: "function", function: { name: "get_weather", description: "The weather in a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } };

// The composer's reasoning effort and demo tool, added to a send's body.
function agentOptions(body) {
  const model = $("model").value.trim();
  if (model) body.model = model;
  if ($("effort").value) body.reasoning_effort = $("effort").value;
  if ($("tool-choice").value) Object.assign(body, { tools: [WEATHER_TOOL], tool_choice: $("tool-choice").value });
  return body;
}

// The open chat, remembered for the tab (not one in the trash): a reload opens it again and follows its
// running answer.
function setChat(id) {
  state.chatId = id;
  if (id && !state.trash) sessionStorage.setItem("streamgate-chat", id);
  else sessionStorage.removeItem("streamgate-chat");
}

// Open a chat; a reply still streaming in it (sent before a reload, or from another tab) is followed to its end.
async function openChat(id, follow = true) {
  state.abort?.abort();  // stop reading another chat's reply: it runs on (on_disconnect: "continue")
  setChat(id);
  try {
    const query = state.trash ? "" : "?message_limit=200";
    const chat = state.trash
      ? (await api(`/v1/chats?deleted=true&limit=100`)).items.find((c) => c.id === id)
      : await api(`/v1/chats/${id}${query}`);
    state.chat = chat;
    $("chat-title").textContent = chat.title || "Untitled chat";
    $("messages").replaceChildren();
    const shown = (chat.messages || []).map(renderMessage);
    const last = chat.messages?.at(-1);
    if (follow && !state.trash && last?.role === "assistant" && last.status === "streaming") {
      streamReply(resumeRequest(id, last.id), "", shown.at(-1));
    }
    $("rename").disabled = state.trash;
    $("delete").disabled = state.trash;
    $("restore").hidden = !state.trash;
    $("share").disabled = state.trash;
    showShareLink(state.trash ? null : chat.share_id);
  } catch (error) { setChat(null); setStatus(error.message, true); }
  loadChats();
}

// A chat's share link opens this page's read-only view of it; null hides the link.
function showShareLink(shareId) {
  $("share-box").hidden = !shareId;
  $("unshare").hidden = !shareId;
  $("share-link").value = shareId ? `${location.origin}/?shared=${encodeURIComponent(shareId)}` : "";
}

async function share() {
  try {
    const link = await api(`/v1/chats/${state.chatId}/share`, { method: "POST" });
    showShareLink(link.share_id);
    $("share-link").select();
    const copied = navigator.clipboard ? navigator.clipboard.writeText($("share-link").value) : Promise.reject();
    copied.then(() => setStatus("Link copied. Anyone with it can read this chat."),
                () => setStatus("Copy the link: anyone with it can read this chat."));
  } catch (error) { setStatus(error.message, true); }
}

async function unshare() {
  try {
    await api(`/v1/chats/${state.chatId}/share`, { method: "DELETE" });
    showShareLink(null);
    setStatus("The link no longer works.");
  } catch (error) { setStatus(error.message, true); }
}

// /?shared=<id>: the shared chat, read without a token; nothing on the page can change it.
async function openShared(shareId) {
  document.body.classList.add("shared-view");
  $("shared-note").hidden = false;
  const response = await fetch(`/v1/shared/${encodeURIComponent(shareId)}`);
  if (!response.ok) {
    $("chat-title").textContent = "Shared chat not found";
    setStatus("This link is unknown or no longer shared.", true);
    return;
  }
  const chat = await response.json();
  $("chat-title").textContent = chat.title || "Untitled chat";
  chat.messages.forEach(renderMessage);
}

// The paperclip: the chosen file is uploaded at once (POST /v1/files) and goes with the next message
// as an attachment ({file_id}).
async function attach(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file || !state.token) return;
  const form = new FormData();
  form.append("file", file);
  setStatus(`Uploading ${file.name}…`);
  try {
    const response = await fetch("/v1/files", { method: "POST", headers: { Authorization: `Bearer ${state.token}` }, body: form });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error(describe(response.status, body));
    showAttached(body);
    setStatus("");
  } catch (error) { setStatus(error.message, true); }
}

function showAttached(file) {
  state.attached = file;
  $("attached").hidden = !file;
  $("attached-name").textContent = file ? `📎 ${file.name}` : "";
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
      let name = "message", data = "", id = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
        else if (line.startsWith("id: ")) id = line.slice(4);
      }
      if (data) onEvent(name, JSON.parse(data), id);
    }
  }
}

async function send(event) {
  event.preventDefault();
  const content = $("message").value.trim();
  if (!content || !state.token) return;
  const body = agentOptions(state.chatId ? { content } : { message: content });
  const attached = state.attached;
  if (attached) body.attachments = [{ file_id: attached.id }];
  const path = state.chatId ? `/v1/chats/${state.chatId}/messages` : "/v1/chat";
  renderMessage({ role: "user", content, parts: attached ? [{ type: "attachment", name: attached.name }] : [] });
  $("message").value = "";
  await stream(path, body, content, attached);
}

// Post a send and stream its reply into the page. The turn runs to its end even if the page goes
// (on_disconnect: "continue"): a reload, or a dropped connection, picks it up again.
async function stream(path, body, content, attached = null) {
  const sent = JSON.stringify({ ...body, on_disconnect: "continue" });
  await streamReply(async (signal) => {
    const response = await fetch(path, { method: "POST", headers: headers(), body: sent, signal });
    if (response.ok && attached) showAttached(null);
    return response;
  }, content);
}

// A request for the chat's running turn (reply `messageId`): its events after event `after`, all of them
// when the page holds none; then the live ones to its end.
function resumeRequest(chatId, messageId, after = "") {
  const query = messageId ? `?message_id=${encodeURIComponent(messageId)}` : "";
  const extra = after ? { "Last-Event-ID": after } : {};
  return (signal) => fetch(`/v1/chats/${chatId}/stream${query}`, { headers: headers(extra), signal });
}

// Stream a reply into the page from `request` (a send, or a resume of a running turn): into `reply` when the
// page shows it already (emptied when the events start over), else into a new item. A stream the network
// drops is resumed after the last event read, into the same item.
async function streamReply(request, content, reply = null) {
  const controller = new AbortController();
  state.abort = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus(reply ? "Catching up with the answer…" : "Waiting for the model…");
  let chatId = state.chatId;
  const calls = {};
  let lastId = "", ended = false;
  const onEvent = (name, data, id) => {
    if (id) lastId = id;
    if (name === "start") {
      chatId = data.chat_id;
      if (state.chatId !== data.chat_id) {
        setChat(data.chat_id);
        $("chat-title").textContent = content.slice(0, 80);
        $("rename").disabled = $("delete").disabled = $("share").disabled = false;
      }
      reply = startReply(reply, data.assistant_message_id);
      setStatus("Streaming…");
    } else if (name === "delta") {
      reply.querySelector(".text").textContent += data.text;
    } else if (name === "reasoning") {
      reasoningOf(reply).textContent += data.text;
    } else if (name === "tool_call_start") {
      calls[data.id] = toolCard(reply, data.id, data.name);
    } else if (name === "tool_call_delta") {
      calls[data.id].input.textContent += data.arguments;
    } else if (name === "tool_call") {
      calls[data.id].input.textContent = JSON.stringify(data.input);
    } else if (name === "done") {
      ended = true;
      if (data.finish_reason === "tool_calls") askResults(reply);
      reply.querySelector(".meta").textContent = `${data.finish_reason} · ${data.usage.total_tokens} tokens · ${Math.round(data.duration_ms)} ms`;
      reply.dataset.finishReason = data.finish_reason;
      setStatus(data.finish_reason === "cancelled" ? "Stopped." : "");
    } else if (name === "error") {
      ended = true;
      setStatus(`The model failed: ${data.message}`, true);
    }
  };
  try {
    for (let failures = 0; !ended;) {
      try {
        const response = await request(controller.signal);
        if (response.status === 204) {  // nothing kept to follow: the reply as stored
          if (state.chatId === chatId) openChat(chatId, false);
          return;
        }
        if (!response.ok) {
          const failure = await response.json().catch(() => null);
          throw new Error(describe(response.status, failure));
        }
        failures = 0;
        await readStream(response, onEvent);
        if (!ended) throw new TypeError("The stream ended before the answer did");
      } catch (error) {
        // The network failed, not the gateway nor the user: the turn runs on, so pick it up after the last
        // event read, a few times, waiting longer each time.
        if (!(error instanceof TypeError) || controller.signal.aborted || !chatId || failures === RETRY_MS.length) throw error;
        setStatus("Connection lost; picking the answer up again…");
        await new Promise((resolve) => setTimeout(resolve, RETRY_MS[failures++]));
        if (controller.signal.aborted) return;
        request = resumeRequest(chatId, reply?.dataset.id, lastId);
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") setStatus(error.message, true);
  } finally {
    if (state.abort === controller) {
      state.abort = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      loadChats();
    }
  }
}

// The item a reply's `start` streams into: the one the page shows for that message, emptied (its events
// start over, and the text stored so far would be shown twice), else a new one.
function startReply(reply, messageId) {
  const shown = reply ?? [...$("messages").querySelectorAll("li.assistant")].find((item) => item.dataset.id === messageId);
  if (!shown) return renderMessage({ role: "assistant", content: "", id: messageId });
  shown.querySelectorAll(".reasoning, .tool-card").forEach((part) => part.remove());
  shown.querySelector(".text").textContent = "";
  shown.querySelector(".meta").textContent = "";
  shown.dataset.id = messageId;
  return shown;
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
$("attach").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", attach);
$("detach").addEventListener("click", () => showAttached(null));
$("new-chat").addEventListener("click", () => {
  state.abort?.abort(); setChat(null); $("messages").replaceChildren(); $("chat-title").textContent = "New chat";
  $("share").disabled = true; showShareLink(null);
});
$("share").addEventListener("click", share);
$("unshare").addEventListener("click", unshare);
$("show-trash").addEventListener("change", (event) => { state.trash = event.target.checked; loadChats(); });
$("rename").addEventListener("click", async () => {
  const title = prompt("New title", state.chat?.title || "");
  if (!title) return;
  try { await api(`/v1/chats/${state.chatId}`, { method: "PATCH", body: JSON.stringify({ title }) }); openChat(state.chatId); }
  catch (error) { setStatus(error.message, true); }
});
$("delete").addEventListener("click", async () => {
  try {
    await api(`/v1/chats/${state.chatId}`, { method: "DELETE" });
    setChat(null); $("messages").replaceChildren(); $("share").disabled = true; showShareLink(null); loadChats();
  }
  catch (error) { setStatus(error.message, true); }
});
$("restore").addEventListener("click", async () => {
  try { await api(`/v1/chats/${state.chatId}/restore`, { method: "POST" }); $("show-trash").checked = false; state.trash = false; openChat(state.chatId); }
  catch (error) { setStatus(error.message, true); }
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});

const sharedId = new URLSearchParams(location.search).get("shared");
if (sharedId !== null) {
  openShared(sharedId);
} else {
  fetch("/dev/token", { method: "HEAD" }).then((r) => { $("dev-token").hidden = !r.ok; });
  const opened = sessionStorage.getItem("streamgate-chat");
  if (state.token) { $("token").value = state.token; if (opened) openChat(opened); else loadChats(); }
}
