// The AI SDK's AbstractChat (what useChat wraps) with its state held in memory, as a test drives it.
import { AbstractChat } from "ai";

// useChat's state outside React: the messages (optionally some to start from, as a reloaded page holds
// them), the status and the error; `onChange` sees the messages after each change.
class State {
  constructor(messages = [], onChange = () => {}) {
    this.status = "ready";
    this.error = undefined;
    this.messages = messages;
    this.onChange = onChange;
  }
  pushMessage(message) { this.changed([...this.messages, message]); }
  popMessage() { this.changed(this.messages.slice(0, -1)); }
  replaceMessage(index, message) { this.changed(this.messages.map((m, n) => (n === index ? message : m))); }
  snapshot(thing) { return structuredClone(thing); }
  changed(messages) {
    this.messages = messages;
    this.onChange(messages);
  }
}

export class Chat extends AbstractChat {
  constructor({ messages, onChange, ...init }) { super({ ...init, state: new State(messages, onChange) }); }
}

// The text of a UI message's text parts.
export function textOf(message) {
  return (message?.parts ?? []).filter((part) => part.type === "text").map((part) => part.text).join("");
}
