// adapter-server playground: plain JavaScript against the server's own HTTP API (docs/api.md); no build step,
// nothing fetched from elsewhere. The API key, when the server asks for one, lives in this tab's memory.
"use strict";

let apiKey = "";
const $ = (id) => document.getElementById(id);

function authHeaders(extra) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : { ...extra };
}

async function call(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: authHeaders(opts.headers || {}) });
  if (r.ok) return r;
  if (r.status === 401 || r.status === 403) {
    $("key-box").hidden = false;
    $("api-key").focus();
  }
  let msg = `${r.status} ${r.statusText}`;
  try {
    const e = (await r.json()).error;
    msg = `${r.status} ${e.type}: ${e.message}`;
  } catch (_) { /* not the error shape */ }
  throw new Error(msg);
}

// -- adapters ---------------------------------------------------------------------------------
function cell(tr, text) {
  const td = document.createElement("td");
  td.textContent = text;
  tr.appendChild(td);
  return td;
}

function size(bytes) {
  return bytes >= 1 << 20 ? `${(bytes / (1 << 20)).toFixed(1)} MB` : `${(bytes / 1024).toFixed(1)} kB`;
}

async function loadAdapters() {
  let adapters;
  try {
    adapters = (await (await call("/adapters")).json()).adapters;
  } catch (e) {
    $("upload-status").textContent = e.message;
    return;
  }
  const body = $("adapter-rows");
  body.replaceChildren();
  for (const a of adapters) {
    const tr = document.createElement("tr");
    tr.dataset.adapter = a.adapter_id;
    cell(tr, a.adapter_id);
    cell(tr, a.method);
    cell(tr, a.variant);
    cell(tr, a.num_parameters.toLocaleString());
    cell(tr, size(a.size_bytes));
    cell(tr, a.tier);
    cell(tr, a.created_at.replace("T", " ").replace("Z", ""));
    const actions = cell(tr, "");
    const pick = document.createElement("input");
    pick.type = "file";
    pick.multiple = true;
    pick.hidden = true;
    pick.onchange = () => upload(a.adapter_id, [...pick.files], true);
    const rep = document.createElement("button");
    rep.textContent = "replace";
    rep.onclick = () => pick.click();
    const del = document.createElement("button");
    del.textContent = "delete";
    del.onclick = async () => {
      if (!confirm(`Delete ${a.adapter_id}? Running requests finish; new ones get 404.`)) return;
      try {
        await call(`/adapters/${encodeURIComponent(a.adapter_id)}`, { method: "DELETE" });
      } catch (e) {
        $("upload-status").textContent = e.message;
      }
      loadAdapters();
    };
    actions.append(pick, rep, " ", del);
    body.appendChild(tr);
  }
  // the adapters to compare: keep what was ticked
  const box = $("choices");
  const ticked = new Set([...box.querySelectorAll(".choice:checked")].map((c) => c.value));
  for (const old of [...box.querySelectorAll("label")].slice(1)) old.remove();
  for (const a of adapters) {
    const label = document.createElement("label");
    const c = document.createElement("input");
    c.type = "checkbox";
    c.className = "choice";
    c.value = a.adapter_id;
    c.checked = ticked.has(a.adapter_id);
    label.append(c, ` ${a.adapter_id}`);
    box.appendChild(label);
  }
}

let dropped = [];

async function upload(id, files, replace) {
  const status = $("upload-status");
  if (!files.length) {
    status.textContent = "choose or drop the files of a saved adapter folder first";
    return;
  }
  const form = new FormData();
  form.append("adapter_id", id);
  for (const f of files) form.append("files", f, f.name);
  status.textContent = `uploading ${id} (${files.length} files)…`;
  dropped = []; // used once: the next upload takes what is chosen or dropped then
  try {
    const info = await (await call(`/adapters${replace ? "?replace=true" : ""}`, { method: "POST", body: form })).json();
    status.textContent = `${replace ? "replaced" : "uploaded"} ${info.adapter_id}: ${info.method}, ${info.variant}`;
  } catch (e) {
    status.textContent = e.message;
  }
  loadAdapters();
}

async function entryFiles(entry) {
  if (entry.isFile) return [await new Promise((ok, bad) => entry.file(ok, bad))];
  const reader = entry.createReader();
  const entries = [];
  for (;;) { // readEntries gives at most 100 at a time
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) break;
    entries.push(...batch);
  }
  return (await Promise.all(entries.filter((e) => e.isFile).map(entryFiles))).flat();
}

function setupUpload() {
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    dropped = entries.length ? (await Promise.all(entries.map(entryFiles))).flat() : [...e.dataTransfer.files];
    $("upload-status").textContent = `${dropped.length} files dropped: ${dropped.map((f) => f.name).join(", ")}`;
  };
  $("demo").onclick = async () => {
    $("upload-status").textContent = "writing demo adapters…";
    try {
      const added = (await (await call("/adapters/demo", { method: "POST" })).json()).adapters;
      $("upload-status").textContent = added.length ? `added ${added.map((a) => a.adapter_id).join(", ")}` : "the demo adapters are there";
    } catch (e) {
      $("upload-status").textContent = e.message;
    }
    await loadAdapters();
    for (const c of document.querySelectorAll(".choice")) if (c.value.startsWith("demo-")) c.checked = true;
  };
  $("files").onchange = $("folder").onchange = () => { dropped = []; };
  $("upload").onsubmit = (e) => {
    e.preventDefault();
    const files = dropped.length ? dropped : [...$("files").files, ...$("folder").files];
    upload($("adapter-id").value.trim(), files, $("replace").checked);
  };
}

// -- side by side -----------------------------------------------------------------------------
function params() {
  const num = (id) => Number($(id).value);
  const p = {
    prompt: $("prompt").value,
    max_new_tokens: num("max-new-tokens"),
    temperature: num("temperature"),
    top_p: num("top-p"),
    top_k: num("top-k"),
    ignore_eos: $("ignore-eos").checked,
  };
  if ($("seed").value !== "") p.seed = num("seed");
  const stop = $("stop").value.split("|").filter((x) => x);
  if (stop.length) p.stop = stop;
  return p;
}

function newColumn(adapter) {
  const col = document.createElement("div");
  col.className = "column";
  col.dataset.adapter = adapter;
  const h = document.createElement("h3");
  h.textContent = adapter || "bare model";
  const text = document.createElement("div");
  text.className = "text";
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = "waiting…";
  col.append(h, text, stats);
  $("columns").appendChild(col);
  return col;
}

async function stream(col, body) {
  const [text, stats] = [col.querySelector(".text"), col.querySelector(".stats")];
  const t0 = performance.now();
  let first = null, last = null;
  const ids = [];
  const show = (extra) => {
    const ttft = first === null ? "-" : `${Math.round(first - t0)} ms`;
    const rate = ids.length > 1 && last > first ? ((ids.length - 1) / ((last - first) / 1000)).toFixed(1) : "-";
    stats.textContent = `first token ${ttft} · ${rate} tokens/s · ${ids.length} tokens${extra || ""}`;
  };
  try {
    const r = await call("/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ...body, stream: true }),
    });
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", final = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(`${ev.error.type}: ${ev.error.message}`);
        if ("finish_reason" in ev) {
          final = ev;
        } else if ("token_id" in ev) {
          last = performance.now();
          if (first === null) first = last;
          ids.push(ev.token_id);
          text.textContent += ev.text;
          show();
        }
      }
    }
    show(final ? ` · ${final.finish_reason}` : "");
  } catch (e) {
    col.classList.add("error");
    text.textContent += (text.textContent ? "\n" : "") + e.message;
  }
  col.dataset.tokenIds = JSON.stringify(ids);
  col.dataset.done = "1";
}

async function runAll() {
  const chosen = [...document.querySelectorAll(".choice:checked")].map((c) => c.value);
  if (!chosen.length) {
    $("run-status").textContent = "tick the bare model or an adapter";
    return;
  }
  $("columns").replaceChildren();
  $("run").disabled = true;
  $("run-status").textContent = `running ${chosen.length} at once…`;
  const body = params();
  const t0 = performance.now();
  await Promise.all(chosen.map((a) => stream(newColumn(a), { ...body, adapter_id: a || null })));
  $("run-status").textContent = `done in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
  $("run").disabled = false;
  loadAdapters(); // tiers change as adapters load
}

// -- live metrics -------------------------------------------------------------------------------
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([^{\s]+)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const [name, value] = [m[1], Number(m[3])];
    out[name] = (out[name] || 0) + value; // summed over its labels
    const type = (m[2] || "").match(/adapter_type="([^"]*)"/);
    if (type) out[`${name}|${type[1]}`] = (out[`${name}|${type[1]}`] || 0) + value;
  }
  return out;
}

let previous = null;

async function pollMetrics() {
  try {
    const now = { t: performance.now(), m: parseMetrics(await (await fetch("/metrics")).text()) };
    if (previous) {
      const d = (k) => (now.m[k] || 0) - (previous.m[k] || 0);
      const dt = (now.t - previous.t) / 1000;
      const p = "adapter_server_";
      $("m-throughput").textContent = (d(p + "generated_tokens_total") / dt).toFixed(1);
      const passes = d(p + "batch_size_count");
      $("m-batch").textContent = passes ? (d(p + "batch_size_sum") / passes).toFixed(1) : "-";
      $("m-distinct").textContent = passes ? (d(p + "distinct_adapters_per_batch_sum") / passes).toFixed(1) : "-";
      $("m-queue").textContent = now.m[p + "queue_depth"] ?? "-";
      const fwd = now.m[p + "forward_seconds_total"] || 0;
      const rows = Object.keys(now.m).filter((k) => k.startsWith(p + "adapter_compute_seconds_total|") && now.m[k] > 0);
      const body = $("m-share");
      body.replaceChildren();
      for (const k of rows) {
        const tr = document.createElement("tr");
        cell(tr, k.split("|")[1]);
        cell(tr, fwd ? `${((100 * now.m[k]) / fwd).toFixed(1)}%` : "-");
        body.appendChild(tr);
      }
    }
    previous = now;
  } catch (_) { /* the server restarts: try again at the next tick */ }
}

async function modelName() {
  try {
    const models = (await (await call("/v1/models")).json()).data;
    const base = models.find((m) => !m.parent) || models[0];
    $("model").textContent = base ? `base model: ${base.id}` : "";
  } catch (_) { /* asks for the key, if that was why */ }
}

$("api-key").onchange = () => {
  apiKey = $("api-key").value.trim();
  loadAdapters();
  modelName();
};
$("run").onclick = runAll;
setupUpload();
loadAdapters();
modelName();
pollMetrics();
setInterval(pollMetrics, 2000);
