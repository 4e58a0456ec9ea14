"use strict";
// afina studio: a little JavaScript over server-rendered pages. No framework, no build step.
const $ = (id) => document.getElementById(id);
const view = document.body.dataset.view;
const run = document.body.dataset.run;

async function api(method, url, body, raw) {
  const options = { method, headers: {} };
  if (raw !== undefined) { options.body = raw; options.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { options.body = JSON.stringify(body); options.headers["Content-Type"] = "application/json"; }
  const response = await fetch(url, options);
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  return { ok: response.ok, status: response.status, body: data };
}

// ---- charts: series [{name, points: [[x, y], ...]}] drawn as SVG polylines with axes and a legend
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
function drawChart(svg, series) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 640, H = 260, L = 56, R = 12, T = 12, B = 48;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const all = series.flatMap((s) => s.points);
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e); return e;
  };
  if (!all.length) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#666" }, "no data yet"); return; }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" });
  el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" });
  // enough digits that the axis's three labels differ (a learning rate moves in its third digit)
  const digits = y1 > y0 ? Math.min(6, Math.max(1, Math.ceil(Math.log10(Math.max(Math.abs(y0), Math.abs(y1)) / (y1 - y0))) + 1)) : 1;
  const fmt = (v) => Math.abs(v) >= 0.01 || v === 0 ? v.toPrecision(Math.max(3, digits + 1)) : v.toExponential(digits);
  for (const y of [y0, (y0 + y1) / 2, y1]) el("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 11 }, fmt(y));
  for (const x of [x0, x1]) el("text", { x: sx(x), y: H - B + 14, "text-anchor": "middle", "font-size": 11 }, String(x));
  el("text", { x: (L + W - R) / 2, y: H - B + 28, "text-anchor": "middle", "font-size": 11 }, "step");
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    if (s.points.length > 1) el("polyline", { points: s.points.map((p) => sx(p[0]) + "," + sy(p[1])).join(" "), fill: "none", stroke: colour, "stroke-width": 2 });
    for (const p of s.points.length <= 40 ? s.points : []) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: colour });
    el("rect", { x: L + 8 + i * 150, y: H - 14, width: 10, height: 10, fill: colour });
    el("text", { x: L + 22 + i * 150, y: H - 5, "font-size": 11 }, s.name);
  });
  svg.dataset.points = String(all.length);
}
document.querySelectorAll("svg.chart[data-series]").forEach((svg) => drawChart(svg, JSON.parse(svg.dataset.series)));

// ---- jobs: start, stop, and a status that follows the running job
function showError(id, body, status) {
  const target = $(id);
  if (target) target.textContent = (body && body.error) ? body.error : (status ? "HTTP " + status : "");
}

document.querySelectorAll("button.start").forEach((button) => {
  button.addEventListener("click", async () => {
    const body = { stage: button.dataset.stage };
    if (button.dataset.resume) body.resume = true;
    if (body.stage === "export") body.formats = [...document.querySelectorAll("input[name=format]:checked")].map((b) => b.value);
    const r = await api("POST", `/api/runs/${run}/jobs`, body);
    if (!r.ok) { showError("job-error", r.body, r.status); return; }
    $("job-error").textContent = "";
    followJob(true);
  });
});
if ($("stop")) $("stop").addEventListener("click", async () => {
  const r = await api("POST", `/api/runs/${run}/stop`);
  showError("job-error", r.ok ? { error: "stopping: the run saves a checkpoint and exits" } : r.body, r.ok ? 0 : r.status);
});

let following = false;
async function followJob(started) {
  if (following) return;
  following = true;
  const state = $("job-state");
  state.dataset.running = "true";
  state.textContent = "running...";
  for (;;) {
    await new Promise((done) => setTimeout(done, 1000));
    const r = await api("GET", `/api/runs/${run}`);
    if (!r.ok) continue;
    const job = r.body.job;
    $("job-log").textContent = r.body.log;
    if (view === "train") await pollMetrics();
    if (!job || !job.running) break;
    state.textContent = `${job.stage} is running (pid ${job.pid}, since ${job.started_at})`;
  }
  following = false;
  location.reload(); // the stage wrote its results: render them
}
if ($("job-state") && $("job-state").dataset.running === "true") followJob(false);

// ---- estimate: memory only (new run), or memory and time from the prepared rows (train page)
async function estimate(name, time) {
  $("estimate-result").textContent = time ? "estimating (afina estimate: loads the model, times a few steps)..." : "estimating (afina estimate --memory-only)...";
  const r = await api("POST", `/api/runs/${name}/estimate`, { time });
  $("estimate-result").textContent = r.ok ? (r.body.fits ? "fits: " : "WARNING: ") + r.body.output : (r.body.error || "HTTP " + r.status);
  $("estimate-result").dataset.done = "true";
}
if (view === "train" && $("estimate")) $("estimate").addEventListener("click", () => estimate(run, true));

// ---- train: live numbers and curves from metrics.jsonl
const metrics = [];
async function pollMetrics() {
  const r = await api("GET", `/api/runs/${run}/metrics?since=${metrics.length}`);
  if (!r.ok) return;
  metrics.push(...r.body.rows);
  const last = metrics[metrics.length - 1];
  const lastVal = [...metrics].reverse().find((m) => m.val_loss !== undefined && m.val_loss !== null);
  const p = r.body.progress;
  if (last) {
    $("live-step").textContent = p.total ? `${last.step} / ${p.at_most ? "at most " : ""}${p.total}` : String(last.step);
    $("live-loss").textContent = last.loss.toFixed(4);
    $("live-val_loss").textContent = lastVal ? lastVal.val_loss.toFixed(4) : "—";
    $("live-lr").textContent = last.lr.toExponential(2);
    $("live-tokens_per_s").textContent = String(last.tokens_per_s);
    $("live-memory").textContent = String(last.peak_memory_mb);
  }
  $("live-eta").textContent = p.eta_s === null ? "—" : (p.at_most ? "at most " : "") + (p.eta_s < 90 ? Math.round(p.eta_s) + " s" : (p.eta_s / 60).toFixed(1) + " min");
  drawChart($("loss-chart"), [
    { name: "train loss", points: metrics.filter((m) => m.loss !== undefined).map((m) => [m.step, m.loss]) },
    { name: "validation loss", points: metrics.filter((m) => m.val_loss !== undefined && m.val_loss !== null).map((m) => [m.step, m.val_loss]) },
  ]);
  drawChart($("lr-chart"), [{ name: "learning rate", points: metrics.map((m) => [m.step, m.lr]) }]);
}
if (view === "train") pollMetrics();

// ---- new run: data, schema and mapping, recipe form, estimate, save
function chosenPath() { return $("data-path").value; }

async function refreshFiles(select) {
  const r = await api("GET", "/api/files");
  if (!r.ok) return;
  const picker = $("data-path");
  picker.innerHTML = "<option value=''>(choose)</option>";
  for (const f of r.body.files) {
    const o = document.createElement("option");
    o.value = f.path; o.textContent = `${f.path} (${f.size.toLocaleString()} bytes)`;
    picker.appendChild(o);
  }
  if (select) picker.value = select;
}

function mappingFields() {
  const fields = {};
  document.querySelectorAll("#mapping select").forEach((s) => { if (s.value) fields[s.dataset.canon] = s.value; });
  return fields;
}

function renderMapping(columns) {
  const canonical = JSON.parse(document.querySelector("[data-canonical]").dataset.canonical);
  const schema = $("schema").value;
  const box = $("mapping");
  const before = Object.assign(JSON.parse(box.dataset.fields || "{}"), mappingFields());
  box.innerHTML = "";
  const names = schema === "auto" ? [] : canonical[schema];
  if (!names.length) { box.innerHTML = "<p class=hint>Choose a schema to map its fields to your columns.</p>"; return; }
  for (const canon of names) {
    const id = "map-" + canon;
    const p = document.createElement("p");
    const label = document.createElement("label");
    label.htmlFor = id; label.textContent = `${canon} ← `;
    const select = document.createElement("select");
    select.id = id; select.dataset.canon = canon;
    select.innerHTML = "<option value=''>(guess)</option>";
    for (const c of columns) { const o = document.createElement("option"); o.value = c; o.textContent = c; select.appendChild(o); }
    if (before[canon]) select.value = before[canon];
    p.appendChild(label); p.appendChild(select); box.appendChild(p);
  }
}

let columns = [];
async function checkSchema() {
  $("data-error").textContent = "";
  if (!chosenPath()) { $("schema-result").textContent = "choose a data file first"; return; }
  const r = await api("POST", "/api/schema", { path: chosenPath(), schema: $("schema").value, fields: mappingFields() });
  if (!r.ok) { showError("data-error", r.body, r.status); return; }
  const b = r.body;
  if (b.columns.length && JSON.stringify(b.columns) !== JSON.stringify(columns)) { columns = b.columns; renderMapping(columns); }
  $("schema-result").textContent = b.error
    ? `columns: ${b.columns.join(", ")} — ${b.error}`
    : `columns: ${b.columns.join(", ")} — schema ${b.schema} (${b.mapping})`;
  $("schema-result").className = b.error ? "error" : "ok";
  $("schema-preview").textContent = b.preview ? JSON.stringify(b.preview, null, 1) : "";
}

if (view === "new") {
  $("upload-send").addEventListener("click", async () => {
    const file = $("upload").files[0];
    if (!file) { $("data-error").textContent = "choose a file to upload"; return; }
    const r = await api("POST", "/api/uploads?name=" + encodeURIComponent(file.name), undefined, file);
    if (!r.ok) { showError("data-error", r.body, r.status); return; }
    await refreshFiles(r.body.path);
    checkSchema();
  });
  $("data-path").addEventListener("change", checkSchema);
  $("schema").value = $("schema").dataset.initial || "auto";
  $("schema").addEventListener("change", () => { renderMapping(columns); checkSchema(); });
  $("check-schema").addEventListener("click", checkSchema);
  if (chosenPath()) checkSchema();

  const form = $("recipe-form");
  const values = () => {
    const out = { name: $("f-name").value.trim() };
    form.querySelectorAll("[data-key]").forEach((input) => {
      const key = input.dataset.key;
      if (key === "name") return;
      const value = input.type === "checkbox" ? (input.checked ? "true" : "false") : input.value;
      if (value !== input.dataset.initial) out[key] = input.type === "checkbox" ? input.checked : value;
    });
    if (chosenPath()) out["data.path"] = chosenPath();
    if ($("schema").value !== "auto") out["data.schema"] = $("schema").value;
    const fields = mappingFields();
    if (Object.keys(fields).length) out["data.fields"] = JSON.stringify(fields);
    return out;
  };
  const clearErrors = () => document.querySelectorAll("#recipe-form .error").forEach((e) => { e.textContent = ""; });
  const showProblems = (r) => {
    clearErrors();
    let first = null, unplaced = [];
    for (const p of r.body.problems || []) {
      const slot = $("f-" + p.field.replace(/\./g, "-") + "-err");
      if (slot) {
        slot.textContent = p.message;
        const details = slot.closest("details"); if (details) details.open = true;
        const input = $("f-" + p.field.replace(/\./g, "-")); if (input) input.setAttribute("aria-invalid", "true");
        first = first || input;
      } else unplaced.push(p.message);
    }
    $("form-error").textContent = unplaced.length ? unplaced.join("\n") : (r.body.problems && r.body.problems.length ? "" : r.body.error);
    if (first) first.focus();
  };
  const save = async () => {
    form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
    const r = await api("POST", "/api/recipes", { values: values(), replace: Boolean(form.dataset.edit) });
    if (!r.ok) { showProblems(r); $("save-result").textContent = `not saved (HTTP ${r.status})`; return null; }
    clearErrors();
    form.dataset.edit = r.body.name;
    $("f-name").readOnly = true;
    $("recipe-yaml").textContent = r.body.yaml;
    $("save-result").innerHTML = "";
    $("save-result").append(`saved ${r.body.path} — `);
    const a = document.createElement("a"); a.href = `/runs/${r.body.name}/prepare`; a.textContent = "go to Prepare";
    $("save-result").appendChild(a);
    return r.body.name;
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); save(); });
  $("estimate").addEventListener("click", async () => {
    const name = await save();
    if (!name) return;
    await estimate(name, false);
  });
  $("save-prepare").addEventListener("click", async () => {
    const name = await save();
    if (!name) return;
    const r = await api("POST", `/api/runs/${name}/jobs`, { stage: "prepare" });
    if (!r.ok) { $("save-result").textContent = r.body.error; return; }
    location.href = `/runs/${name}/prepare`;
  });
}

// ---- chat: base and tuned side by side, rate and correct into the request log
if (view === "chat") {
  let models = JSON.parse($("chat").dataset.models || "[]");
  let pair = null;
  const setModels = (body) => { pair = { tuned: body.tuned, base: body.base }; $("chat-status").textContent = "loaded: " + body.models.join(", "); };
  $("load-model").addEventListener("click", async () => {
    $("chat-status").textContent = "loading...";
    const r = await api("POST", `/api/runs/${run}/serve`);
    if (!r.ok) { $("chat-status").textContent = r.body.error; return; }
    setModels(r.body);
  });
  if (models.length) pair = { tuned: models[0], base: models[models.length - 1] };

  const feedback = (box, id) => {
    const bar = document.createElement("div");
    bar.className = "feedback";
    const status = document.createElement("span");
    status.setAttribute("role", "status");
    const send = async (rating, correction) => {
      const r = await api("POST", `/chat/${run}/v1/feedback`, { id, rating, correction: correction || null });
      status.textContent = r.ok ? "feedback recorded" : "not recorded: " + ((r.body.error && r.body.error.message) || r.status);
    };
    for (const [label, rating, text] of [["+1 good", 1, "good answer"], ["-1 bad", -1, "bad answer"]]) {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = label; b.setAttribute("aria-label", "rate: " + text); b.className = "rate";
      b.onclick = () => send(rating);
      bar.appendChild(b);
    }
    const label = document.createElement("label");
    const fix = document.createElement("input");
    fix.className = "correction"; fix.id = "fix-" + id; label.htmlFor = fix.id; label.textContent = " correction ";
    const save = document.createElement("button");
    save.type = "button"; save.textContent = "Save correction"; save.className = "save-correction";
    save.onclick = () => send(-1, fix.value.trim());
    bar.append(label, fix, save, status);
    box.appendChild(bar);
  };

  const ask = async (model, column, text) => {
    const box = document.createElement("div");
    box.className = "answer";
    const q = document.createElement("p"); q.className = "question"; q.textContent = text;
    const a = document.createElement("p"); a.className = "reply"; a.textContent = "...";
    box.append(q, a);
    column.appendChild(box);
    const r = await api("POST", `/chat/${run}/v1/chat/completions`, {
      model, messages: [{ role: "user", content: text }], max_tokens: parseInt($("chat-max").value, 10) || 32,
    });
    if (!r.ok) { a.textContent = "error: " + ((r.body.error && (r.body.error.message || r.body.error)) || r.status); return; }
    const content = r.body.choices[0].message.content.trim().replace(/\n{3,}/g, "\n\n");
    a.textContent = content || "(an empty answer)";
    const logged = $("logged-count");
    logged.textContent = String(parseInt(logged.textContent, 10) + 1);
    box.dataset.id = r.body.id;
    feedback(box, r.body.id);
    box.dataset.done = "true";
  };
  $("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("chat-prompt").value.trim();
    if (!text) return;
    if (!pair) { $("chat-status").textContent = "load the models first"; return; }
    $("chat-prompt").value = "";
    await Promise.all([ask(pair.base, $("answers-base"), text), ask(pair.tuned, $("answers-tuned"), text)]);
  });
  $("next-data").addEventListener("click", async () => {
    const r = await api("POST", `/api/runs/${run}/next-data`);
    const out = $("next-result");
    if (!r.ok) { out.textContent = r.body.error; return; }
    out.textContent = `wrote ${r.body.counts.written} training rows to ${r.body.path} (${r.body.counts.corrected} corrected, ${r.body.counts.rated_good} rated good) — `;
    const link = document.createElement("a"); link.href = r.body.next; link.textContent = "start a new run from it";
    out.appendChild(link);
  });
}
