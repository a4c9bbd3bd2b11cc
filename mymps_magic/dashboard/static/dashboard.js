// The page's few behaviours: refresh #status while visible, post actions as JSON (same origin),
// and read the NDJSON streams of load and generate as they arrive.
"use strict";

const statusBox = document.getElementById("status");
const refreshMs = Number(document.body.dataset.refreshMs);

async function refresh() {
  if (document.hidden) return; // a hidden tab asks nothing of the accelerator
  try {
    const response = await fetch("status");
    statusBox.innerHTML = await response.text();
  } catch (error) {
    statusBox.querySelector(".connection")?.replaceChildren(`● dashboard unreachable: ${error}`);
  }
}
setInterval(refresh, refreshMs);
document.addEventListener("visibilitychange", refresh);

function post(path, body) {
  return fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) if (line.trim()) yield JSON.parse(line);
  }
}

function say(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

statusBox.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  button.disabled = true;
  const body = button.dataset.action === "unload" ? { name: button.dataset.name } : { id: button.dataset.id };
  const answer = await (await post(button.dataset.action, body)).json();
  if (answer.error) alert(answer.error);
  await refresh();
});

document.getElementById("load-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const bar = document.getElementById("load-progress");
  const message = document.getElementById("load-message");
  bar.hidden = false;
  bar.value = 0;
  say(message, "loading…");
  const response = await post("load", Object.fromEntries(form));
  if (!response.ok) return say(message, (await response.json()).error, true);
  for await (const item of events(response)) {
    if ("progress" in item) { bar.value = item.progress; say(message, item.message); }
    if (item.done) { bar.value = 1; say(message, item.done); }
    if (item.error) say(message, item.error, true);
  }
  await refresh();
});

document.getElementById("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = Object.fromEntries(new FormData(event.target));
  form.max_new_tokens = Number(form.max_new_tokens);
  const output = document.getElementById("generate-output");
  const message = document.getElementById("generate-message");
  output.textContent = "";
  output.dataset.updates = "0";
  say(message, "generating…");
  const response = await post("generate", form);
  if (!response.ok) return say(message, (await response.json()).error, true);
  for await (const item of events(response)) {
    if ("text" in item) {
      output.textContent += item.text;
      output.dataset.updates = String(Number(output.dataset.updates) + 1);
    }
    if (item.done) say(message, `done: ${item.done.tokens_generated} tokens in ${item.done.time_s} s`);
    if (item.error) say(message, item.error, true);
  }
});
