// The chat page: conversation, composer, transport toggle, Stop, and the status line.

import { render } from "./render.js";
import { ChatTurn, getToken, setToken } from "./transport.js";

const TRANSPORT_KEY = "relay.transport";

const $ = (id) => document.getElementById(id);
const log = $("log");
const form = $("composer");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
const transport = $("transport");
const demoBadge = $("demo");

const tokenForm = $("token-form");
const tokenInput = $("token-input");
const tokenNote = $("token-note");

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
  prompt.focus();
});
$("token-forget").addEventListener("click", () => {
  setToken("");
  tokenInput.value = "";
  tokenNote.textContent = "Token forgotten.";
});

/** The conversation so far, in OpenAI's format; sent whole with each turn. */
let messages = [];
/** The turn in progress, if any. */
let current = null;

transport.value = readTransport();
transport.addEventListener("change", () => {
  try {
    localStorage.setItem(TRANSPORT_KEY, transport.value);
  } catch {
    // storage disabled: the choice lasts for this page only
  }
});

function readTransport() {
  try {
    const saved = localStorage.getItem(TRANSPORT_KEY);
    if (saved === "eventsource" || saved === "fetch") return saved;
  } catch {
    // storage disabled
  }
  return "eventsource";
}

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
  prompt.value = "";
  send(text);
});

stopButton.addEventListener("click", () => {
  if (current) current.stop();
});

$("new-chat").addEventListener("click", () => {
  if (current) current.stop();
  current = null;
  messages = [];
  log.replaceChildren();
  demoBadge.hidden = true;
  setStatus("idle", "Ready");
  setBusy(false);
  prompt.focus();
});

function addMessage(role, label) {
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = label;
  const content = document.createElement("div");
  content.className = "content";
  const note = document.createElement("div");
  note.className = "note";
  article.append(who, content, note);
  log.append(article);
  return article;
}

function setStatus(state, text) {
  statusLine.dataset.state = state;
  statusLine.textContent = text;
}

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  transport.disabled = busy;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
}

function send(text) {
  messages.push({ role: "user", content: text });
  render(addMessage("user", "You").querySelector(".content"), text);
  const article = addMessage("assistant", "Assistant");
  article.dataset.state = "connecting";
  const content = article.querySelector(".content");
  const note = article.querySelector(".note");
  window.scrollTo(0, document.body.scrollHeight);

  const mode = transport.value;
  const t0 = performance.now();
  let firstToken = null;
  let deltas = 0;
  let answer = "";
  let keepalives = 0;
  let model = "";
  let phase = "connecting";
  let resumed = false;
  let frame = 0;

  const repaint = () => {
    frame = 0;
    const stick = nearBottom();
    render(content, answer);
    if (stick) window.scrollTo(0, document.body.scrollHeight);
  };
  const showStatus = () => {
    const now = performance.now();
    const prefix = resumed ? "Resumed · " : "";
    if (phase === "connecting") {
      setStatus("connecting", `Connecting (${mode === "fetch" ? "fetch stream" : "EventSource"})…`);
    } else if (phase === "waiting") {
      const kept = keepalives ? ` · ${keepalives} keepalive${keepalives > 1 ? "s" : ""}` : "";
      setStatus("waiting", `${prefix}Waiting for the first token… ${seconds(now - t0)}${kept}`);
    } else if (phase === "streaming") {
      const rate = deltas / Math.max((now - firstToken) / 1000, 0.001);
      setStatus("streaming", `${prefix}Streaming${model ? ` from ${model}` : ""} · ${deltas} tokens · `
                + `${rate.toFixed(1)} tok/s`);
    } else if (phase === "reconnecting") {
      setStatus("reconnecting", "Connection lost · reconnecting…");
    }
  };
  const ticker = setInterval(showStatus, 250);

  const turn = new ChatTurn(mode, { messages: messages.slice() }, {
    start(evt) {
      model = evt.model || "";
      demoBadge.hidden = !evt.demo;
      article.querySelector(".who").textContent = evt.demo ? `${model} (demo model)` : model || "Assistant";
      if (phase === "connecting") phase = "waiting";
      showStatus();
    },
    delta(evt) {
      if (!evt.content) return;
      if (firstToken === null) firstToken = performance.now();
      deltas += 1;
      answer += evt.content;
      phase = "streaming";
      article.dataset.state = "streaming";
      if (!frame) frame = requestAnimationFrame(repaint);
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
    repaint();
    if (current !== turn) return;  // "new chat" was pressed meanwhile
    current = null;
    setBusy(false);
    const total = performance.now() - t0;
    article.dataset.state = result.kind;
    if (result.kind === "done") {
      const ttft = firstToken === null ? "no tokens" : `first token ${seconds(firstToken - t0)}`;
      setStatus("done", `Done · ${ttft} · total ${seconds(total)} · ${deltas} tokens`);
    } else if (result.kind === "stopped") {
      note.textContent = "Stopped";
      setStatus("stopped", `Stopped after ${seconds(total)} · ${deltas} tokens`);
    } else {
      note.textContent = `Error: ${result.message}`;
      setStatus("error", `Error: ${result.message}`);
      if (result.code === "unauthorized") showTokenForm("This relay needs an access token.");
    }
    // A stopped or broken answer stays in the conversation as far as it got.
    if (answer) messages.push({ role: "assistant", content: answer });
    prompt.focus();
  });
}

setStatus("idle", "Ready");
prompt.focus();
