// The chat page: keeps the conversation, sends it to /v1/chat/completions with stream: true, and shows the
// reply as its SSE chunks arrive. Stop aborts the fetch (the server then aborts the request); Clear forgets all.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function loadInfo() {
  try {
    const r = await fetch("/info", { headers: headers() });
    if (r.status === 401) { setStatus("this server needs an API key (see Settings)"); return; }
    const info = await r.json();
    state.model = info.model;
    $("model").textContent = info.model + " · context " + info.max_model_len;
    $("template-name").textContent = info.template.name === "model" ? "the model's own" : info.template.name;
    $("template-source").textContent = info.template.source;
    setStatus("");
  } catch (e) {
    setStatus("cannot reach the server: " + e);
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function number(id) { const v = $(id).value; return v === "" ? null : Number(v); }

function requestBody() {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const body = {
    model: state.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: number("temperature"), top_p: number("top_p"), max_tokens: number("max_tokens"),
    presence_penalty: number("presence_penalty"), frequency_penalty: number("frequency_penalty"),
  };
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  const stop = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  return body;
}

// Yields the JSON payload of each "data:" event of an SSE response body, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  if (!state.model) await loadInfo();
  state.history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant streaming", "");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let content = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(err.error ? err.error.message : r.statusText);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) setStatus(chunk.usage.completion_tokens + " tokens");
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        content += choice.delta.content;
        reply.textContent = content;
        reply.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      const note = document.createElement("span");
      note.className = "stopped";
      note.textContent = " (stopped)";
      reply.appendChild(note);
    } else {
      reply.className = "message error";
      reply.textContent = "error: " + e.message;
      state.history.pop();  // the failed turn does not join the conversation
      content = null;
    }
  } finally {
    reply.classList.remove("streaming");
    if (content !== null && state.controller === controller) state.history.push({ role: "assistant", content });
    if (state.controller === controller) { state.controller = null; setBusy(false); }
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => {
  const controller = state.controller;
  state.controller = null;
  if (controller) controller.abort();
  state.history = [];
  $("conversation").replaceChildren();
  setBusy(false);
  setStatus("conversation cleared");
});
for (const id of ["temperature", "top_p", "presence_penalty", "frequency_penalty"]) {
  $(id).addEventListener("input", () => { $(id + "-value").textContent = $(id).value; });
}
$("api_key").addEventListener("change", loadInfo);
loadInfo();
