// minigem web UI: images + question -> /v1/chat/completions (stream: true), answer streamed in.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
let history = [];      // OpenAI messages sent so far (images as data: URLs)
let pending = [];      // data: URLs of images chosen for the next message
let modelName = null;
let busy = false;

function bubble(cls, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function showThumbs() {
  const box = $("thumbs");
  box.replaceChildren();
  pending.forEach((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image " + (i + 1);
    img.onclick = () => { pending.splice(i, 1); showThumbs(); };
    box.appendChild(img);
  });
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

$("images").addEventListener("change", async (ev) => {
  for (const f of ev.target.files) pending.push(await readAsDataURL(f));
  ev.target.value = "";
  showThumbs();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function* sse(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  const content = [];
  for (const url of pending) content.push({ type: "image_url", image_url: { url } });
  if (text) content.push({ type: "text", text });
  bubble("user", text, pending);
  const messages = history.concat([{ role: "user", content }]);
  pending = [];
  showThumbs();
  const answer = bubble("assistant", "");
  const out = answer.querySelector(".text");
  const body = { model: modelName, messages, stream: true,
                 temperature: Number($("temperature").value) || 0,
                 max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 128)) };
  const wantImage = $("gen-image").checked;
  if (wantImage) body.modalities = ["text", "image"];
  let gotImage = false;
  const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({}));
    answer.remove();
    throw new Error((err.error && err.error.message) || resp.statusText);
  }
  for await (const data of sse(resp)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    const delta = (chunk.choices[0] || {}).delta || {};
    if (delta.content) out.textContent += delta.content;
    for (const im of delta.images || []) {
      const img = document.createElement("img");
      img.src = im.image_url.url;
      img.alt = "generated image";
      img.className = "generated";
      answer.appendChild(img);
      gotImage = true;
    }
    log.scrollTop = log.scrollHeight;
  }
  if (wantImage && !gotImage) {
    const note = document.createElement("small");
    note.className = "note";
    note.textContent = "(no image: the model wrote no image prompt)";
    answer.appendChild(note);
  }
  history = messages.concat([{ role: "assistant", content: out.textContent }]);
}

// Mini-Gemini only (/health "mining"): the patch-mining heat map of the message's first image,
// from POST /v1/explain, shown under the answer. A failure here never fails the chat.
async function showMining(url, question) {
  const answers = log.querySelectorAll(".msg.assistant");
  const answer = answers[answers.length - 1];
  if (!answer) return;
  const note = document.createElement("small");
  note.className = "mining-note";
  note.textContent = "(mining heat map…)";
  answer.appendChild(note);
  const body = { model: modelName, image_url: { url }, question: question || "Describe the image.",
                 temperature: Number($("temperature").value) || 0,
                 max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 128)) };
  try {
    const resp = await fetch("/v1/explain", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
    const img = document.createElement("img");
    img.src = data.heatmap;
    img.alt = "mining heat map";
    img.className = "heatmap";
    note.replaceWith(img);
    const cap = document.createElement("small");
    cap.className = "mining-note";
    const tops = data.top_tokens.map((t) => `#${t.rank} ${t.view === "image" ? "" : t.view + " "}` +
      `(${t.row},${t.col}) ${(100 * t.score).toFixed(1)}%`);
    const shown = answer.querySelector(".text").textContent.trim();
    cap.textContent = "relied on most: " + tops.join(", ") +
      (data.answer.trim() !== shown ? ` (heat map for the single-turn answer: ${data.answer})` : "");
    answer.appendChild(cap);
  } catch (e) {
    note.textContent = "(no heat map: " + String(e.message || e) + ")";
  }
  log.scrollTop = log.scrollHeight;
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (busy || (!text && !pending.length)) return;
  busy = true;
  $("send").disabled = true;
  log.dataset.state = "busy";
  $("prompt").value = "";
  const shots = pending.slice();  // the message's images (send() clears pending)
  try {
    await send(text);
    if (shots.length && $("show-mining").checked) await showMining(shots[0], text);
    log.dataset.state = "done";
  } catch (e) {
    bubble("error", String(e.message || e));
    log.dataset.state = "error";
  } finally {
    busy = false;
    $("send").disabled = false;
  }
});

$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});

$("reset").addEventListener("click", () => {
  history = []; pending = []; showThumbs(); log.replaceChildren(); log.dataset.state = "idle";
});

fetch("/health").then((r) => r.json()).then((h) => {
  modelName = h.model;
  $("model").textContent = h.model;
  $("key-row").hidden = !h.auth_required;
  $("max-tokens").max = h.max_tokens_limit;
  $("max-tokens").value = Math.min(Number($("max-tokens").value), h.max_tokens_limit);
  $("mining-label").hidden = !h.mining;
  if (h.image_generation) {
    $("gen-image").disabled = false;
    $("gen-label").setAttribute("aria-disabled", "false");
    $("gen-label").title = "ask the model for an image (<GEN>) and draw its <h>…</h> prompt";
  }
  document.body.dataset.ready = "true";
}).catch(() => { $("model").textContent = "server unreachable"; });
