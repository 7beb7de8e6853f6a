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
  if ($("gen-image").checked) body.modalities = ["text", "image"];
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
      answer.appendChild(img);
    }
    log.scrollTop = log.scrollHeight;
  }
  history = messages.concat([{ role: "assistant", content: out.textContent }]);
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (busy || (!text && !pending.length)) return;
  busy = true;
  $("send").disabled = true;
  log.dataset.state = "busy";
  $("prompt").value = "";
  try {
    await send(text);
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
  if (h.image_generation) {
    $("gen-image").disabled = false;
    $("gen-label").setAttribute("aria-disabled", "false");
    $("gen-label").title = "also generate an image from the answer";
  }
  document.body.dataset.ready = "true";
}).catch(() => { $("model").textContent = "server unreachable"; });
