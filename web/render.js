// Model output → DOM, safely: text only ever goes in through textContent, never as HTML.
// Plain text keeps its line breaks (CSS white-space: pre-wrap); ``` or ~~~ fences become
// <pre><code> blocks.  An unclosed fence (an answer still streaming) runs to the end.

const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;

/** Split text into [{kind: "text"|"code", text, lang}] blocks. */
export function blocks(text) {
  const out = [];
  const lines = text.split("\n");
  let prose = [];
  let code = null;  // {fence, lang, lines}
  const flushProse = () => {
    if (prose.length) out.push({ kind: "text", text: prose.join("\n") });
    prose = [];
  };
  for (const line of lines) {
    if (code === null) {
      const m = FENCE.exec(line);
      if (m && !(m[1][0] === "`" && m[2].includes("`"))) {
        flushProse();
        code = { fence: m[1], lang: m[2].trim().split(/\s+/)[0] || "", lines: [] };
      } else {
        prose.push(line);
      }
    } else {
      const close = line.trim();
      if (close.length >= code.fence.length && close === code.fence[0].repeat(close.length)) {
        out.push({ kind: "code", text: code.lines.join("\n"), lang: code.lang });
        code = null;
      } else {
        code.lines.push(line);
      }
    }
  }
  if (code !== null) out.push({ kind: "code", text: code.lines.join("\n"), lang: code.lang });
  flushProse();
  return out;
}

/** Replace the children of `container` with the rendering of `text`. */
export function render(container, text) {
  const nodes = [];
  const all = blocks(text);
  for (const [i, block] of all.entries()) {
    if (block.kind === "code") {
      const pre = document.createElement("pre");
      if (block.lang) {
        const label = document.createElement("span");
        label.className = "lang";
        label.textContent = block.lang;
        pre.append(label);
      }
      const code = document.createElement("code");
      code.textContent = block.text;
      pre.append(code);
      nodes.push(pre);
    } else {
      // Blank lines around a code block are the block's margin, not text.
      let text = block.text;
      if (i > 0) text = text.replace(/^\n+/, "");
      if (i < all.length - 1) text = text.replace(/\n+$/, "");
      if (text === "" && all.length > 1) continue;
      const p = document.createElement("div");
      p.className = "text";
      p.textContent = text;
      nodes.push(p);
    }
  }
  container.replaceChildren(...nodes);
}
