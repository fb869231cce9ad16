// One turn of the conversation over /chat (DESIGN.md), in either transport:
//
// - "eventsource": POST /chat with Accept: application/json, then an EventSource on the
//   "events" URL of the reply (never built here).  The browser reconnects by itself and sends
//   Last-Event-ID; it is closed on the terminal event.
// - "fetch": POST /chat answered with text/event-stream, read through a ReadableStream and
//   SSEParser.  A connection that drops before the terminal event is resumed with
//   GET <Location> and a Last-Event-ID header naming the last event seen.
//
// Either way the turn ends exactly once, with {kind: "done", event}, {kind: "error", message,
// code} or {kind: "stopped"}.  Events whose id was already seen are ignored, so a resume can
// never show text twice.

import { SSEParser } from "./sse-parser.js";

const MAX_RESUMES = 5;
const TOKEN_KEY = "relay.token";

// The access token (docs/security.md) lives in sessionStorage: this tab only, never in a URL
// or a cookie.  It travels as a header; EventSource, which cannot send one, opens the signed
// "events" URL the authenticated POST returned.
export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: the token cannot be kept
  }
}

export function withAuth(headers = {}) {
  const token = getToken();
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

export class ChatTurn {
  /**
   * @param {"eventsource"|"fetch"} mode
   * @param {object} body   the POST /chat body
   * @param {object} on     callbacks: start(evt), delta(evt), keepalive(), reconnecting(), resumed()
   */
  constructor(mode, body, on) {
    this.mode = mode;
    this.body = body;
    this.on = on;
    this.streamUrl = null;     // /chat/{id} as the relay named it (Location / "events")
    this.finished = false;
    this.stopped = false;
    this.seen = new Set();
    this.lastId = "";
    this.retryMs = 2000;
    this.abort = new AbortController();
    this.closeConnection = () => this.abort.abort();
    this.result = new Promise((resolve) => { this._resolve = resolve; });
  }

  start() {
    const run = this.mode === "eventsource" ? this._viaEventSource() : this._viaFetch();
    run.catch((err) => {
      if (this.stopped) return;
      const code = err instanceof RelayError && err.status === 401 ? "unauthorized" : "client";
      const param = err instanceof RelayError ? err.param : null;
      this._finish({ kind: "error", code, param, message: describe(err) });
    });
    return this.result;
  }

  /** Stop: close the connection now and ask the relay to cancel the generation. */
  stop() {
    if (this.finished) return;
    this.stopped = true;
    this._finish({ kind: "stopped" });
    this._cancelOnRelay();
  }

  _cancelOnRelay() {
    if (this.streamUrl) {
      fetch(this.streamUrl, { method: "DELETE", headers: withAuth() }).catch(() => {});
    }
  }

  _finish(result) {
    if (this.finished) return;
    this.finished = true;
    this.closeConnection();
    this._resolve(result);
  }

  /** One event from either transport. */
  _event(id, data) {
    if (this.finished) return;
    if (id) {
      if (this.seen.has(id)) return;
      this.seen.add(id);
      this.lastId = id;
    }
    let evt;
    try {
      evt = JSON.parse(data);
    } catch {
      return;  // not ours: the protocol's events are JSON objects
    }
    switch (evt.type) {
      case "start":
        this.on.start(evt);
        break;
      case "delta":
        this.on.delta(evt);
        break;
      case "done":
        this._finish({ kind: "done", event: evt });
        break;
      case "error":
        this._finish({ kind: "error", code: evt.code, message: evt.message || evt.code || "error" });
        break;
      default:
        break;
    }
  }

  async _post(accept) {
    const resp = await fetch("/chat", {
      method: "POST",
      headers: withAuth({ "Content-Type": "application/json", Accept: accept }),
      body: JSON.stringify(this.body),
      signal: this.mode === "fetch" ? this.abort.signal : undefined,
    });
    if (!resp.ok) throw await relayError(resp);
    return resp;
  }

  async _viaEventSource() {
    // Not aborted by Stop: once the reply names the stream, Stop can cancel it on the relay.
    const resp = await this._post("application/json");
    const reply = await resp.json();
    this.streamUrl = new URL(reply.events, document.baseURI).href;
    if (this.stopped) {
      this._cancelOnRelay();
      return;
    }
    const es = new EventSource(reply.events);
    this.closeConnection = () => es.close();
    let reconnecting = false;
    es.onopen = () => {
      if (reconnecting) {
        reconnecting = false;
        this.on.resumed();
      }
    };
    es.onmessage = (e) => this._event(e.lastEventId, e.data);
    es.onerror = () => {
      if (this.finished) return;
      if (es.readyState === EventSource.CONNECTING) {
        reconnecting = true;
        this.on.reconnecting();
      } else {
        this._finish({ kind: "error", code: "client",
                       message: "lost the connection to the relay, and the stream could not be resumed" });
      }
    };
  }

  async _viaFetch() {
    let resp = await this._post("text/event-stream");
    const location = resp.headers.get("Location");
    this.streamUrl = location ? new URL(location, document.baseURI).href : null;
    if (this.stopped) {
      this._cancelOnRelay();
      return;
    }
    let failures = 0;
    for (;;) {
      const parser = new SSEParser();
      try {
        await this._read(resp, parser);
      } catch (err) {
        if (this.finished) return;
        // A network error mid-body: fall through and resume.
      }
      if (this.finished) return;
      if (!this.streamUrl || failures >= MAX_RESUMES) {
        throw new RelayError("lost the connection to the relay before the answer was finished");
      }
      this.on.reconnecting();
      failures += 1;
      await sleep(this.retryMs, this.abort.signal);
      const headers = withAuth({ Accept: "text/event-stream" });
      if (this.lastId) headers["Last-Event-ID"] = this.lastId;
      try {
        resp = await fetch(this.streamUrl, { headers, signal: this.abort.signal });
      } catch (err) {
        if (this.finished) return;
        continue;  // the relay is not reachable yet; try again after the retry delay
      }
      if (resp.status === 204) {
        throw new RelayError("the stream ended while the connection was down");
      }
      if (!resp.ok) throw await relayError(resp);
      failures = 0;
      this.on.resumed();
    }
  }

  async _read(resp, parser) {
    const reader = resp.body.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const rec of parser.feed(value)) {
          if (rec.kind === "event") {
            if (rec.type === "message") this._event(rec.lastEventId, rec.data);
          } else if (rec.kind === "comment") {
            this.on.keepalive(rec.text);
          } else if (rec.kind === "retry") {
            this.retryMs = rec.ms;
          }
          if (this.finished) return;
        }
      }
      parser.end();
    } finally {
      reader.cancel().catch(() => {});
    }
  }
}

export class RelayError extends Error {
  /** `param`: the request field the relay named as the problem (e.g. "model"), if any. */
  constructor(message, status = 0, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function relayError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) {
      return new RelayError(body.error.message, resp.status, body.error.param || null);
    }
  } catch {
    // not JSON: fall back to the status line
  }
  return new RelayError(`the relay answered HTTP ${resp.status} ${resp.statusText}`.trim(), resp.status);
}

function describe(err) {
  if (err instanceof RelayError) return err.message;
  if (err && err.name === "TypeError") return "could not reach the relay (network error)";
  return String((err && err.message) || err);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}
