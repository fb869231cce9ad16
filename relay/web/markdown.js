// Model output → DOM: CommonMark + GFM (marked), sanitised (DOMPurify), code highlighted
// (highlight.js), all vendored under /static/vendor/ (scripts/vendor-web).
//
// Safety, in three layers:
//  1. marked renders raw HTML in an answer as text: a model (or whoever steers it) cannot add
//     markup, only Markdown.
//  2. DOMPurify then removes anything that is not plain content: scripts, event handlers,
//     style attributes, forms, and links or images whose URL is not http(s), mailto or
//     relative (javascript: and data: go).
//  3. Images never load.  An answer's picture could be on any host and would tell that host who
//     read the answer, and the page's CSP allows images only from this origin.  An image is
//     shown as a link to it instead.
// Links open in a new tab with rel="noopener noreferrer".  Table alignment becomes a class,
// because the CSP allows no style attribute.
//
// A streaming answer is rendered incrementally (renderStreaming): the blocks marked has finished
// (every top-level block but the last) are rendered once and kept; each frame re-renders only the
// last, growing block, so a long answer costs the same per frame at its end as at its start.  When
// the answer ends it is rendered whole once (render), so the DOM is a pure function of the text:
// an answer split anywhere (inside a table row, a fence or a link) ends exactly as the same answer
// in one piece.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/hljs/core.min.js";
import bash from "./vendor/hljs/languages/bash.min.js";
import c from "./vendor/hljs/languages/c.min.js";
import cpp from "./vendor/hljs/languages/cpp.min.js";
import css from "./vendor/hljs/languages/css.min.js";
import diff from "./vendor/hljs/languages/diff.min.js";
import go from "./vendor/hljs/languages/go.min.js";
import java from "./vendor/hljs/languages/java.min.js";
import javascript from "./vendor/hljs/languages/javascript.min.js";
import json from "./vendor/hljs/languages/json.min.js";
import markdown from "./vendor/hljs/languages/markdown.min.js";
import python from "./vendor/hljs/languages/python.min.js";
import rust from "./vendor/hljs/languages/rust.min.js";
import sql from "./vendor/hljs/languages/sql.min.js";
import typescript from "./vendor/hljs/languages/typescript.min.js";
import xml from "./vendor/hljs/languages/xml.min.js";
import yaml from "./vendor/hljs/languages/yaml.min.js";

const LANGUAGES = { bash, c, cpp, css, diff, go, java, javascript, json, markdown, python, rust, sql, typescript,
                    xml, yaml };
for (const [name, grammar] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, grammar);
hljs.registerAliases(["sh", "shell", "zsh"], { languageName: "bash" });
hljs.registerAliases(["js", "jsx", "mjs"], { languageName: "javascript" });
hljs.registerAliases(["ts", "tsx"], { languageName: "typescript" });
hljs.registerAliases(["py"], { languageName: "python" });
hljs.registerAliases(["html", "svg"], { languageName: "xml" });
hljs.registerAliases(["yml"], { languageName: "yaml" });
hljs.registerAliases(["rs"], { languageName: "rust" });

const escapeHtml = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
  .replace(/"/g, "&quot;").replace(/'/g, "&#39;");

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML in an answer is text, never markup.
    html({ text }) {
      return escapeHtml(text);
    },
    code({ text, lang }) {
      const name = (lang || "").trim().split(/\s+/)[0].toLowerCase();
      const known = name && hljs.getLanguage(name);
      const body = known ? hljs.highlight(text, { language: name, ignoreIllegals: true }).value : escapeHtml(text);
      const label = name ? `<span class="lang">${escapeHtml(name)}</span>` : "";
      const cls = known ? ` class="hljs language-${escapeHtml(name)}"` : ' class="hljs"';
      return `<pre>${label}<code${cls}>${body}</code></pre>\n`;
    },
    image({ href, title, text }) {
      const shown = escapeHtml(text || title || href || "image");
      return href ? `<a href="${escapeHtml(href)}" class="image-link">🖼 ${shown}</a>` : shown;
    },
  },
});

const SAFE_URL = /^(?:https?:|mailto:|#|\/(?!\/)|\.{0,2}\/|[^:/?#]*(?:[/?#]|$))/i;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (!node.hasAttribute("href")) return;
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  const align = node.getAttribute && node.getAttribute("align");
  if (align) {
    node.removeAttribute("align");
    if (["left", "center", "right"].includes(align)) node.classList.add(`align-${align}`);
  }
});

const PURIFY = {
  ALLOWED_URI_REGEXP: SAFE_URL,
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed", "img",
                "svg", "math", "video", "audio", "source", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "ping", "formaction"],
  ADD_ATTR: ["target"],
  RETURN_DOM_FRAGMENT: true,
};

/** The sanitised DOM for Markdown `text`. */
export function markdownFragment(text) {
  const html = marked.parse(text, { async: false });
  const fragment = DOMPurify.sanitize(html, PURIFY);
  // A link whose address DOMPurify removed (javascript:, data:) is no link: its text stays, as text.
  for (const a of fragment.querySelectorAll("a:not([href])")) a.replaceWith(...a.childNodes);
  return fragment;
}

function decorated(text, copy) {
  const fragment = markdownFragment(text);
  if (copy) {
    for (const pre of fragment.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy-code";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      button.addEventListener("click", () => copy(code ? code.textContent : "", button));
      pre.prepend(button);
    }
  }
  return fragment;
}

/** What renderStreaming keeps per container: the source rendered for good, and the live nodes. */
const streams = new WeakMap();

/** Replace the children of `container` with the rendering of `text`; code blocks get a copy button. */
export function render(container, text, { copy } = {}) {
  streams.delete(container);
  container.replaceChildren(decorated(text, copy));
  container.dataset.source = text;
}

/** Render a text that is still growing: only what changed since the last frame is rendered again
 * (the finished blocks stay as they are).  `render` once the text is final. */
export function renderStreaming(container, text, { copy } = {}) {
  let state = streams.get(container);
  if (!state || !text.startsWith(state.done)) {
    container.replaceChildren();
    state = { done: "", live: [] };
    streams.set(container, state);
  }
  const rest = text.slice(state.done.length);
  // Every top-level block but the last is finished: nothing that arrives later changes it.
  const tokens = marked.lexer(rest);
  let last = tokens.length - 1;
  while (last > 0 && tokens[last].type === "space") last -= 1;
  const finished = tokens.slice(0, Math.max(last, 0)).map((t) => t.raw).join("");
  for (const node of state.live) node.remove();
  if (finished && rest.startsWith(finished)) {
    container.append(decorated(finished, copy));
    state.done += finished;
  }
  const live = decorated(text.slice(state.done.length), copy);
  state.live = [...live.childNodes];
  container.append(live);
  container.dataset.source = text;
}

/** Plain text, for what needs none of Markdown (the user's own messages keep their characters). */
export function renderPlain(container, text) {
  const div = document.createElement("div");
  div.className = "text";
  div.textContent = text;
  container.replaceChildren(div);
  container.dataset.source = text;
}
