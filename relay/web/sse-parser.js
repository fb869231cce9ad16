// Incremental text/event-stream parser (WHATWG HTML, "Parsing an event stream").
//
// Feed it the bytes of a response body as they arrive, in chunks split anywhere: a UTF-8
// character, a CR LF pair, a line or an event may straddle two reads.  Bytes are decoded
// with one TextDecoder in stream mode; lines end at CR LF, LF or CR, and a CR that ends a
// chunk is remembered so an LF opening the next chunk is not taken for an empty line.
//
// feed() returns what completed, in order:
//   {kind: "event", type, data, lastEventId}  a dispatched event (type "message" when unnamed)
//   {kind: "comment", text}                    a line starting with ":" (keepalives)
//   {kind: "retry", ms}                        a valid retry field
// An event or a line still open when the stream ends is dropped, as the spec says.

export class SSEParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");  // replaces invalid bytes with U+FFFD; strips the BOM
    this.buffer = "";
    this.skipLF = false;     // the previous chunk ended with CR: an LF opening this one belongs to it
    this.data = "";
    this.sawData = false;
    this.eventType = "";
    this.idBuffer = "";      // the last event ID buffer: persists across events, per spec
    this.lastEventId = "";
  }

  /** Parse a chunk (Uint8Array, or an already decoded string); return the completed records. */
  feed(chunk) {
    const text = typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    return this._lines(text);
  }

  /** The body ended: an unterminated line or event is dropped; the parser is ready for a new body. */
  end() {
    this.decoder.decode();  // flush (and forget) a partial character
    this.buffer = "";
    this.skipLF = false;
    this.data = "";
    this.sawData = false;
    this.eventType = "";
  }

  _lines(text) {
    const out = [];
    let buf = this.buffer + text;
    let start = 0;
    if (this.skipLF && buf.length > 0) {
      if (buf[0] === "\n") start = 1;
      this.skipLF = false;
    }
    for (let i = start; i < buf.length; i++) {
      const c = buf[i];
      if (c !== "\n" && c !== "\r") continue;
      this._line(buf.slice(start, i), out);
      if (c === "\r") {
        if (i + 1 < buf.length) {
          if (buf[i + 1] === "\n") i++;
        } else {
          this.skipLF = true;  // the LF of this CR LF may come in the next chunk
        }
      }
      start = i + 1;
    }
    this.buffer = buf.slice(start);
    return out;
  }

  _line(line, out) {
    if (line === "") {
      this._dispatch(out);
      return;
    }
    if (line[0] === ":") {
      out.push({ kind: "comment", text: line.slice(1).replace(/^ /, "") });
      return;
    }
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
    }
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.data += value + "\n";
        this.sawData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.idBuffer = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) out.push({ kind: "retry", ms: parseInt(value, 10) });
        break;
      default:
        break;  // unknown fields are ignored
    }
  }

  _dispatch(out) {
    this.lastEventId = this.idBuffer;
    if (!this.sawData) {
      this.eventType = "";
      return;
    }
    const data = this.data.slice(0, -1);  // drop the last LF
    out.push({ kind: "event", type: this.eventType || "message", data, lastEventId: this.lastEventId });
    this.data = "";
    this.sawData = false;
    this.eventType = "";
  }
}
