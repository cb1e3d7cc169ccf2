// Runs useChat's client-side tool loop against Streamgate: the AI SDK's AbstractChat (what useChat wraps)
// with DefaultChatTransport, a tool run in onToolCall (addToolOutput), and sendAutomaticallyWhen resending
// the conversation once every call of the last step has its output.
// Usage: node ui_tools.mjs <gateway> <token> <chatId> <model>
// Prints one JSON line: the final assistant UI message and the bodies the transport posted.
import { DefaultChatTransport, lastAssistantMessageIsCompleteWithToolCalls } from "ai";
import { Chat } from "./chat.mjs";

const [gateway, token, chatId, model] = process.argv.slice(2);

const posted = [];
const weather = {
  type: "function",
  function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } },
};
let finished;
const answered = new Promise((resolve, reject) => { finished = { resolve, reject }; });
const chat = new Chat({
  id: chatId,
  transport: new DefaultChatTransport({
    api: `${gateway}/v1/ui/chat`,
    headers: { Authorization: `Bearer ${token}` },
    body: { model, tools: [weather], tool_choice: "required", reasoning_effort: "low" },
    fetch: async (url, init) => {
      posted.push(JSON.parse(init.body));
      return fetch(url, init);
    },
  }),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
  onToolCall: ({ toolCall }) => {
    chat.addToolOutput({ tool: toolCall.toolName, toolCallId: toolCall.toolCallId, output: { celsius: 18 } });
  },
  onFinish: ({ message, finishReason, isError }) => {
    if (isError) finished.reject(new Error("the stream failed"));
    else if (finishReason !== "tool-calls") finished.resolve(message);
  },
  onError: (error) => finished.reject(error),
});

await chat.sendMessage({ text: "weather in Paris please" });
const message = await answered;
console.log(JSON.stringify({ message, posted }));
