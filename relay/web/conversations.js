// Conversations kept in localStorage: several, surviving a reload, each with its messages in
// OpenAI's format plus what the page shows besides (reasoning, tool calls, how it ended).

const KEY = "relay.conversations";
const CURRENT_KEY = "relay.conversation";

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;  // storage disabled or a value written by something else
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage disabled or full: the conversation lasts for this page only
  }
}

export function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

export class Conversations {
  constructor() {
    const list = read(KEY, []);
    this.list = Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
      : [];
    this.currentId = read(CURRENT_KEY, null);
    if (!this.list.some((c) => c.id === this.currentId)) this.currentId = null;
  }

  get current() {
    return this.list.find((c) => c.id === this.currentId) || null;
  }

  /** The current conversation, made (empty, untitled) if there is none. */
  ensure() {
    let conv = this.current;
    if (!conv) {
      conv = { id: newId(), title: "", messages: [], updated: Date.now() };
      this.list.unshift(conv);
      this.select(conv.id);
    }
    return conv;
  }

  select(id) {
    this.currentId = id;
    write(CURRENT_KEY, id);
  }

  /** Start afresh: the next message begins a new conversation (an empty one is not kept). */
  startNew() {
    this.list = this.list.filter((c) => c.messages.length > 0);
    this.currentId = null;
    write(CURRENT_KEY, null);
    this.save();
  }

  rename(id, title) {
    const conv = this.list.find((c) => c.id === id);
    if (conv) {
      conv.title = title.trim().slice(0, 200);
      this.save();
    }
  }

  remove(id) {
    this.list = this.list.filter((c) => c.id !== id);
    if (this.currentId === id) this.select(null);
    this.save();
  }

  clear() {
    this.list = [];
    this.select(null);
    this.save();
  }

  touch(conv) {
    conv.updated = Date.now();
    if (!conv.title) {
      const first = conv.messages.find((m) => m.role === "user");
      if (first) conv.title = first.content.replace(/\s+/g, " ").trim().slice(0, 60);
    }
    // Most recent first.
    this.list = [conv, ...this.list.filter((c) => c !== conv)];
    this.save();
  }

  save() {
    write(KEY, this.list.filter((c) => c.messages.length > 0));
  }
}

/** One conversation as Markdown, for Export. */
export function toMarkdown(conv) {
  const lines = [`# ${conv.title || "Conversation"}`, ""];
  for (const m of conv.messages) {
    const who = m.role === "user" ? "You" : `Assistant${m.model ? ` (${m.model})` : ""}`;
    lines.push(`## ${who}`, "");
    if (m.reasoning) lines.push("<details><summary>Thinking</summary>", "", m.reasoning, "", "</details>", "");
    lines.push(m.content || "", "");
    for (const call of m.toolCalls || []) {
      lines.push(`Tool call \`${call.name}\`:`, "", "```json", call.arguments, "```", "");
    }
  }
  return lines.join("\n");
}
