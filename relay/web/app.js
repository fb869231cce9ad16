// The chat page: conversations, the model picker, the composer, Stop, regenerate and edit,
// the thinking and tool-call sections, and the status line.

import { Conversations, toMarkdown } from "./conversations.js";
import { render, renderPlain, renderStreaming } from "./markdown.js";
import { ChatTurn, getToken, setToken, withAuth } from "./transport.js";

const TRANSPORT_KEY = "relay.transport";
const MODEL_KEY = "relay.model";

const $ = (id) => document.getElementById(id);
const log = $("log");
const form = $("composer");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
const transport = $("transport");
const demoBadge = $("demo");
const modelInput = $("model");
const modelList = $("models");
const sidebar = $("sidebar");
const menuButton = $("menu");
const convList = $("conversations");
const clearAll = $("clear-all");
const backdrop = $("backdrop");
const emptyState = $("empty-state");
const emptyModel = $("empty-model");
const emptyDemo = $("empty-demo");
/** The relay answers through its built-in demo model (X-Relay-Demo on GET /v1/models). */
let demoRelay = false;

const tokenForm = $("token-form");
const tokenInput = $("token-input");
const tokenNote = $("token-note");

const convs = new Conversations();
/** The turn in progress, if any. */
let current = null;
/** The relay's default model ("" when every request must name one); null until /v1/models answered. */
let defaultModel = null;

// -- storage helpers ------------------------------------------------------------------------

function stored(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;  // storage disabled
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // storage disabled: the choice lasts for this page only
  }
}

// -- access token ---------------------------------------------------------------------------

function showTokenForm(note) {
  tokenForm.hidden = false;
  tokenNote.textContent = note;
  tokenInput.focus();
}

$("token-button").addEventListener("click", () => {
  if (tokenForm.hidden) showTokenForm(getToken() ? "A token is set for this tab." : "");
  else tokenForm.hidden = true;
});
tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setToken(tokenInput.value.trim());
  tokenInput.value = "";
  tokenForm.hidden = true;
  setStatus("idle", getToken() ? "Token set · Ready" : "Ready");
  loadModels();
  prompt.focus();
});
$("token-forget").addEventListener("click", () => {
  setToken("");
  tokenInput.value = "";
  tokenNote.textContent = "Token forgotten.";
});

// -- transport and model ----------------------------------------------------------------------

transport.value = stored(TRANSPORT_KEY) === "fetch" ? "fetch" : "eventsource";
transport.addEventListener("change", () => store(TRANSPORT_KEY, transport.value));

modelInput.value = stored(MODEL_KEY) || "";
modelInput.addEventListener("change", () => {
  modelInput.value = modelInput.value.trim();
  store(MODEL_KEY, modelInput.value);
  modelInput.removeAttribute("aria-invalid");
});

/** Fill the picker from GET /v1/models: the relay's default first, then what it (or its upstream) serves. */
async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: withAuth({ Accept: "application/json" }) });
  } catch {
    return;  // the relay is unreachable: sending will say so
  }
  if (!resp.ok) return;  // e.g. 401 before a token is given
  defaultModel = resp.headers.get("X-Relay-Default-Model") || "";
  demoRelay = resp.headers.get("X-Relay-Demo") === "1";
  demoBadge.hidden = !demoRelay;
  const body = await resp.json().catch(() => null);
  const names = body && Array.isArray(body.data) ? body.data.map((m) => m && m.id).filter(Boolean) : [];
  modelList.replaceChildren(...names.map((name) => {
    const option = document.createElement("option");
    option.value = name;
    return option;
  }));
  modelInput.placeholder = defaultModel ? defaultModel : "pick a model";
  if (!defaultModel && !modelInput.value && statusLine.dataset.state === "idle") {
    setStatus("idle", "Ready · this relay has no default model: pick one in the model box");
  }
  showEmptyState();
}

/** The first screen: what this is and who answers, until the conversation has a message. */
function showEmptyState() {
  const empty = !log.querySelector(".msg");
  emptyState.hidden = !empty;
  if (!empty) return;
  const model = chosenModel() || defaultModel;
  emptyModel.textContent = model ? `Answers come from ${model}${demoRelay ? " (the demo model)" : ""}.`
    : "Pick a model in the box at the top first.";
  emptyDemo.hidden = !demoRelay;
}

function chosenModel() {
  return modelInput.value.trim();
}

function askForModel(message) {
  modelInput.setAttribute("aria-invalid", "true");
  setStatus("needs-model", message);
  modelInput.focus();
}

// -- the sidebar ------------------------------------------------------------------------------

function setSidebar(open) {
  sidebar.classList.toggle("open", open);
  menuButton.setAttribute("aria-expanded", String(open));
  // The drawer (phone width) dims the chat behind it; a tap there closes it.
  backdrop.hidden = !open || getComputedStyle(menuButton).display === "none";
}

backdrop.addEventListener("click", () => setSidebar(false));

menuButton.addEventListener("click", () => setSidebar(!sidebar.classList.contains("open")));
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && sidebar.classList.contains("open")) {
    setSidebar(false);
    menuButton.focus();
  }
});

function renderSidebar() {
  const items = convs.list.filter((c) => c.messages.length > 0).map((conv) => {
    const li = document.createElement("li");
    li.className = "conv";
    if (conv.id === convs.currentId) li.setAttribute("aria-current", "true");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv-open";
    open.textContent = conv.title || "Untitled";
    open.title = conv.title || "Untitled";
    open.addEventListener("click", () => switchTo(conv.id));
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "conv-rename icon";
    rename.textContent = "✎";
    rename.setAttribute("aria-label", `Rename “${conv.title || "Untitled"}”`);
    rename.addEventListener("click", () => startRename(li, conv));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "conv-delete icon";
    remove.textContent = "✕";
    remove.setAttribute("aria-label", `Delete “${conv.title || "Untitled"}”`);
    remove.addEventListener("click", () => {
      if (conv.id === convs.currentId && current) current.stop();
      convs.remove(conv.id);
      if (!convs.current) showConversation(null);
      renderSidebar();
    });
    li.append(open, rename, remove);
    return li;
  });
  convList.replaceChildren(...items);
  clearAll.disabled = items.length === 0;
  $("export").disabled = !convs.current || convs.current.messages.length === 0;
}

function startRename(li, conv) {
  const input = document.createElement("input");
  input.className = "conv-title-input";
  input.value = conv.title;
  input.setAttribute("aria-label", "Conversation name");
  const done = (save) => {
    if (save) convs.rename(conv.id, input.value);
    renderSidebar();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") done(true);
    if (e.key === "Escape") done(false);
  });
  input.addEventListener("blur", () => done(true), { once: true });
  li.replaceChildren(input);
  input.focus();
  input.select();
}

function switchTo(id) {
  if (current) current.stop();
  convs.select(id);
  showConversation(convs.current);
  renderSidebar();
  setSidebar(false);
  prompt.focus();
}

let clearArmed = null;
clearAll.addEventListener("click", () => {
  // Two steps, so one stray click does not lose every conversation.
  if (!clearArmed) {
    clearAll.textContent = "Click again to delete all";
    clearArmed = setTimeout(() => {
      clearArmed = null;
      clearAll.textContent = "Clear all";
    }, 5000);
    return;
  }
  clearTimeout(clearArmed);
  clearArmed = null;
  clearAll.textContent = "Clear all";
  if (current) current.stop();
  convs.clear();
  showConversation(null);
  renderSidebar();
});

$("export").addEventListener("click", () => {
  const conv = convs.current;
  if (!conv) return;
  const blob = new Blob([toMarkdown(conv)], { type: "text/markdown;charset=utf-8" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${(conv.title || "conversation").replace(/[^\w.-]+/g, "-").slice(0, 60) || "conversation"}.md`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
});

$("new-chat").addEventListener("click", () => {
  if (current) current.stop();  // its answer is kept in its conversation as far as it got
  current = null;
  convs.startNew();
  showConversation(null);
  renderSidebar();
  demoBadge.hidden = !demoRelay;
  setStatus("idle", "Ready");
  setBusy(false);
  prompt.focus();
});

// -- messages ---------------------------------------------------------------------------------

function setStatus(state, text) {
  statusLine.dataset.state = state;
  statusLine.textContent = text;
}

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  transport.disabled = busy;
  for (const b of log.querySelectorAll(".actions button")) b.disabled = busy;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
}

function scrollToEnd() {
  window.scrollTo(0, document.documentElement.scrollHeight);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (plain http on a LAN address): the old way.
    const area = document.createElement("textarea");
    area.value = text;
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const was = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = was; }, 1500);
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** An article for one message; its parts are filled by `fill`. */
function addMessage(role, label) {
  const article = element("article", `msg ${role}`);
  const who = element("div", "who", label);
  const thinking = element("details", "thinking");
  thinking.hidden = true;
  const summary = element("summary", "", "Thinking");
  const thinkingBody = element("div", "thinking-body");
  thinking.append(summary, thinkingBody);
  const content = element("div", "content");
  const tools = element("div", "tools");
  const note = element("div", "note");
  const actions = element("div", "actions");
  article.append(who, thinking, content, tools, note, actions);
  log.append(article);
  emptyState.hidden = true;
  return article;
}

function showReasoning(article, text, open) {
  const details = article.querySelector(".thinking");
  details.hidden = !text;
  details.open = open;
  article.querySelector(".thinking-body").textContent = text;
}

function showTools(article, calls) {
  const box = article.querySelector(".tools");
  box.replaceChildren(...calls.map((call) => {
    const div = element("div", "tool-call");
    const head = element("div", "tool-head");
    head.append(element("span", "tool-label", "Tool call "), element("code", "tool-name", call.name || "…"));
    const args = element("pre", "tool-args");
    args.append(element("code", "", call.arguments || ""));
    div.append(head, args);
    return div;
  }));
}

function addActions(article, message, index, conv) {
  const actions = article.querySelector(".actions");
  const last = index === conv.messages.length - 1;
  if (message.role === "assistant") {
    if (message.content) {
      const copy = element("button", "copy", "Copy");
      copy.type = "button";
      copy.setAttribute("aria-label", "Copy answer");
      copy.addEventListener("click", () => copyText(message.content, copy));
      actions.append(copy);
    }
    if (last) {
      const again = element("button", "regenerate", "Regenerate");
      again.type = "button";
      again.addEventListener("click", () => regenerate());
      actions.append(again);
    }
  } else if (conv.messages.slice(index + 1).every((m) => m.role !== "user")) {
    const edit = element("button", "edit", "Edit");
    edit.type = "button";
    edit.setAttribute("aria-label", "Edit and resend this message");
    edit.addEventListener("click", () => editLast());
    actions.append(edit);
  }
}

function showMessage(message, index, conv) {
  if (message.role === "user") {
    const article = addMessage("user", "You");
    renderPlain(article.querySelector(".content"), message.content);
    addActions(article, message, index, conv);
    return article;
  }
  const article = addMessage("assistant", message.model ? `${message.model}${message.demo ? " (demo model)" : ""}`
    : "Assistant");
  article.dataset.state = message.state || "done";
  showReasoning(article, message.reasoning || "", false);
  render(article.querySelector(".content"), message.content || "", { copy: copyText });
  showTools(article, message.toolCalls || []);
  article.querySelector(".note").textContent = message.note || "";
  addActions(article, message, index, conv);
  return article;
}

function showConversation(conv) {
  log.replaceChildren();
  if (conv) conv.messages.forEach((m, i) => showMessage(m, i, conv));
  showEmptyState();
}

/** Move Edit and Regenerate to the messages they now belong to, leaving the rest of the DOM (and
 * what the live region has announced) as it is. */
function refreshActions(conv) {
  const articles = [...log.querySelectorAll(".msg")];
  if (articles.length !== conv.messages.length) {
    showConversation(conv);
    return;
  }
  articles.forEach((article, i) => {
    article.querySelector(".actions").replaceChildren();
    addActions(article, conv.messages[i], i, conv);
  });
}

/** What is sent: the user's messages and the answers so far (an answer that never began is left out). */
function payload(conv) {
  return conv.messages.filter((m) => m.role === "user" || m.content)
    .map((m) => ({ role: m.role, content: m.content }));
}

// -- composer -----------------------------------------------------------------------------------

prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    form.requestSubmit();
  }
});

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = prompt.value;
  if (current || text.trim() === "") return;
  if (defaultModel === "" && !chosenModel()) {
    askForModel("This relay has no default model: pick one in the model box, then send again");
    return;
  }
  prompt.value = "";
  const conv = convs.ensure();
  if (log.querySelectorAll(".msg").length !== conv.messages.length) showConversation(conv);
  conv.messages.push({ role: "user", content: text });
  convs.touch(conv);
  renderSidebar();
  showMessage(conv.messages[conv.messages.length - 1], conv.messages.length - 1, conv);
  refreshActions(conv);
  runTurn(conv, text);
});

stopButton.addEventListener("click", () => {
  if (current) current.stop();
});

function regenerate() {
  const conv = convs.current;
  if (current || !conv) return;
  const last = conv.messages[conv.messages.length - 1];
  if (!last || last.role !== "assistant") return;
  conv.messages.pop();
  convs.touch(conv);
  const articles = log.querySelectorAll(".msg");
  if (articles.length === conv.messages.length + 1) articles[articles.length - 1].remove();
  refreshActions(conv);
  const user = [...conv.messages].reverse().find((m) => m.role === "user");
  runTurn(conv, user ? user.content : "");
}

function editLast() {
  const conv = convs.current;
  if (current || !conv) return;
  let i = conv.messages.length - 1;
  while (i >= 0 && conv.messages[i].role !== "user") i -= 1;
  if (i < 0) return;
  prompt.value = conv.messages[i].content;
  conv.messages.splice(i);
  convs.touch(conv);
  showConversation(conv);
  renderSidebar();
  prompt.focus();
  prompt.setSelectionRange(prompt.value.length, prompt.value.length);
}

// -- one turn -------------------------------------------------------------------------------------

function runTurn(conv, userText) {
  const model = chosenModel();
  const article = addMessage("assistant", model || "Assistant");
  article.dataset.state = "connecting";
  const content = article.querySelector(".content");
  const note = article.querySelector(".note");
  scrollToEnd();

  const mode = transport.value;
  const t0 = performance.now();
  let firstToken = null;
  let deltas = 0;
  let answer = "";
  let reasoning = "";
  const calls = [];
  let keepalives = 0;
  let shownModel = model;
  let demo = false;
  let phase = "connecting";
  let resumed = false;
  let frame = 0;

  const repaint = (final = false) => {
    frame = 0;
    const stick = nearBottom();
    showReasoning(article, reasoning, answer === "" && calls.length === 0);
    // While it streams, only the growing part is rendered again; at the end, the whole, once.
    (final ? render : renderStreaming)(content, answer, { copy: copyText });
    showTools(article, calls);
    if (stick) scrollToEnd();
  };
  const schedule = () => {
    if (!frame) frame = requestAnimationFrame(() => repaint());
  };
  const showStatus = () => {
    const now = performance.now();
    const prefix = resumed ? "Resumed · " : "";
    if (phase === "connecting") {
      setStatus("connecting", `Connecting (${mode === "fetch" ? "fetch stream" : "EventSource"})…`);
    } else if (phase === "waiting") {
      const kept = keepalives ? ` · ${keepalives} keepalive${keepalives > 1 ? "s" : ""}` : "";
      setStatus("waiting", `${prefix}${reasoning ? "Thinking" : "Waiting for the first token"}… `
                + `${seconds(now - t0)}${kept}`);
    } else if (phase === "streaming") {
      const rate = deltas / Math.max((now - firstToken) / 1000, 0.001);
      setStatus("streaming", `${prefix}Streaming${shownModel ? ` from ${shownModel}` : ""} · ${deltas} tokens · `
                + `${rate.toFixed(1)} tok/s`);
    } else if (phase === "reconnecting") {
      setStatus("reconnecting", "Connection lost · reconnecting…");
    }
  };
  const ticker = setInterval(showStatus, 250);

  const body = { messages: payload(conv) };
  if (model) body.model = model;
  const turn = new ChatTurn(mode, body, {
    start(evt) {
      shownModel = evt.model || model;
      demo = Boolean(evt.demo);
      demoBadge.hidden = !demo;
      article.querySelector(".who").textContent = demo ? `${shownModel} (demo model)` : shownModel || "Assistant";
      if (phase === "connecting") phase = "waiting";
      showStatus();
    },
    delta(evt) {
      if (evt.reasoning) reasoning += evt.reasoning;
      if (Array.isArray(evt.tool_calls)) {
        for (const part of evt.tool_calls) {
          const at = Number.isInteger(part.index) ? part.index : calls.length;
          const call = calls[at] || (calls[at] = { name: "", arguments: "" });
          if (part.function && part.function.name) call.name += part.function.name;
          if (part.function && typeof part.function.arguments === "string") call.arguments += part.function.arguments;
        }
      }
      if (evt.content) {
        if (firstToken === null) firstToken = performance.now();
        deltas += 1;
        answer += evt.content;
        phase = "streaming";
        article.dataset.state = "streaming";
      } else if (phase === "connecting") {
        phase = "waiting";
      }
      schedule();
      showStatus();
    },
    keepalive() {
      keepalives += 1;
      showStatus();
    },
    reconnecting() {
      phase = "reconnecting";
      showStatus();
    },
    resumed() {
      resumed = true;
      phase = firstToken === null ? "waiting" : "streaming";
      showStatus();
    },
  });
  current = turn;
  setBusy(true);
  showStatus();

  turn.start().then((result) => {
    clearInterval(ticker);
    if (frame) cancelAnimationFrame(frame);
    repaint(true);
    const total = performance.now() - t0;
    let noteText = "";
    if (result.kind === "stopped") noteText = "Stopped";
    else if (result.kind === "error") noteText = `Error: ${result.message}`;
    const kept = convs.list.includes(conv);  // not deleted meanwhile
    // The page moved on meanwhile (New, another conversation, a delete): the answer is kept in its
    // own conversation as far as it got, and the screen is left to what is shown now.
    const here = current === turn;
    if (here) {
      current = null;
      setBusy(false);
    }
    if (here && result.kind === "error" && result.param === "model" && !answer) {
      // No default model and none chosen: ask, and give the message back rather than fail it.
      let i = conv.messages.length - 1;
      while (i >= 0 && conv.messages[i].role !== "user") i -= 1;
      if (i >= 0) conv.messages.splice(i);
      convs.touch(conv);
      showConversation(conv);
      renderSidebar();
      prompt.value = userText;
      askForModel(`${result.message} — pick a model in the model box, then send again`);
      return;
    }
    if (kept) {
      // A stopped or broken answer stays in the conversation as far as it got.
      conv.messages.push({ role: "assistant", content: answer, reasoning, toolCalls: calls.filter(Boolean),
                           model: shownModel, demo, state: result.kind, note: noteText });
      convs.touch(conv);
    }
    if (!here) {
      renderSidebar();
      return;
    }
    article.dataset.state = result.kind;
    note.textContent = noteText;
    if (result.kind === "done") {
      const ttft = firstToken === null ? "no tokens" : `first token ${seconds(firstToken - t0)}`;
      setStatus("done", `Done · ${ttft} · total ${seconds(total)} · ${deltas} tokens`);
    } else if (result.kind === "stopped") {
      setStatus("stopped", `Stopped after ${seconds(total)} · ${deltas} tokens`);
    } else {
      setStatus("error", noteText);
      if (result.code === "unauthorized") showTokenForm("This relay needs an access token.");
    }
    if (kept && convs.currentId === conv.id) refreshActions(conv);
    renderSidebar();
    prompt.focus();
  });
}

// -- start --------------------------------------------------------------------------------------

showConversation(convs.current);
renderSidebar();
setStatus("idle", "Ready");
loadModels();
prompt.focus();
