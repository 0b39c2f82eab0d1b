"use strict";
// The page of `lorakit ui`: four views over the JSON API; curves drawn on <canvas>; no asset from the network.
const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("lorakit-token", params.get("token"));
const TOKEN = sessionStorage.getItem("lorakit-token");
const LABELS = {"model.name": "model", "data.task": "task", "data.train": "train data", "data.eval": "eval data",
  "lora.rank": "rank", "lora.alpha": "alpha", "lora.targets": "targets", "optim.lr": "learning rate",
  "optim.epochs": "epochs", "optim.max_steps": "max steps", "optim.batch_size": "batch size"};
const COLORS = ["#3559e0", "#d9485f", "#1f9d55", "#e08a00", "#7b4ddb", "#0f8b8d"];
const state = {info: null, loaded: {}, upload: null, watch: null, timer: null, sort: {key: "started", asc: false},
  checked: new Set(), rows: [], latencies: []};
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  if (TOKEN) headers["Authorization"] = "Bearer " + TOKEN;
  const t0 = performance.now();
  const response = await fetch(path, body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body)});
  state.latencies.push(performance.now() - t0);
  let data = {};
  try { data = await response.json(); } catch (e) { data = {errors: ["the server answered " + response.status]}; }
  if (!response.ok && !data.errors) data.errors = ["the server answered " + response.status];
  return data;
}

function showErrors(list, errors) {
  list.replaceChildren(...(errors || []).map((text) => { const li = document.createElement("li"); li.textContent = text; return li; }));
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(digits);
  return String(value);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

// ------------------------------------------------------------------ views
function show(view) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.view === view));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("hidden", v.id !== "view-" + view));
  clearInterval(state.timer);
  const refresh = {watch: refreshWatch, compare: refreshCompare, try: refreshTry}[view];
  if (refresh) { refresh(); if (view !== "try") state.timer = setInterval(refresh, 1000); }
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));

// ------------------------------------------------------------------ start
function buildForm() {
  $("fields").replaceChildren(...state.info.form_keys.map((key) => {
    const label = document.createElement("label");
    label.textContent = `${LABELS[key] || key} (${key})`;
    const input = document.createElement("input");
    input.name = key; input.dataset.key = key;
    label.append(input);
    return label;
  }));
}

function fillForm(fields) {
  state.loaded = fields;
  document.querySelectorAll("#fields input").forEach((input) => { input.value = fields[input.dataset.key] ?? ""; });
}

function request() {
  const fields = {};
  document.querySelectorAll("#fields input").forEach((input) => {
    const key = input.dataset.key;
    if (input.value !== (state.loaded[key] ?? "")) fields[key] = input.value;
  });
  const body = {name: $("run-name").value.trim(), fields};
  if ($("recipe").value) body.recipe = $("recipe").value;
  else if (state.upload) { body.yaml = state.upload.text; body.filename = state.upload.name; }
  return body;
}

async function check(launch) {
  $("launched").textContent = "";
  const data = await api(launch ? "/api/runs" : "/api/check", request());
  showErrors($("errors"), data.errors);
  if (data.errors) return;
  if (!launch) { $("launched").textContent = `No problems: the run would write ${data.out_dir}.`; return; }
  $("launched").textContent = `Started ${data.name}: ${data.command}`;
  state.watch = data.name;
  show("watch");
}

$("recipe").addEventListener("change", async () => {
  state.upload = null; $("upload").value = ""; showErrors($("errors"), []);
  if (!$("recipe").value) { fillForm({}); $("source").textContent = ""; return; }
  const data = await api("/api/recipe?name=" + encodeURIComponent($("recipe").value));
  showErrors($("errors"), data.errors);
  if (!data.errors) { fillForm(data.fields); $("source").textContent = `recipes/${$("recipe").value}`; }
});

$("upload").addEventListener("change", async () => {
  const file = $("upload").files[0];
  showErrors($("errors"), []);
  if (!file) return;
  if (file.size > state.info.max_upload_bytes) {
    state.upload = null;
    showErrors($("errors"), [`${file.name} is ${file.size.toLocaleString("en")} bytes; the page accepts at most ` +
      `${state.info.max_upload_bytes.toLocaleString("en")} bytes (a training YAML is a few kB): upload the config file, not the data`]);
    return;
  }
  $("recipe").value = "";
  state.upload = {name: file.name, text: await file.text()};
  $("source").textContent = "uploaded " + file.name;
  const data = await api("/api/parse", {yaml: state.upload.text, filename: file.name});
  showErrors($("errors"), data.errors);
  fillForm(data.fields || {});
});

$("run-name").addEventListener("input", () => { $("out-dir").textContent = `${state.info.runs_dir}/${$("run-name").value.trim()}`; });
$("check").addEventListener("click", () => check(false));
$("form").addEventListener("submit", (e) => { e.preventDefault(); check(true); });

// ------------------------------------------------------------------ plots
function plot(canvas, series, {logY = false} = {}) {
  const ratio = window.devicePixelRatio || 1, w = canvas.clientWidth || canvas.width, h = Math.round(w / 2);
  canvas.width = w * ratio; canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const points = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y));
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#6b7385";
  canvas.dataset.points = String(points.length);
  canvas.dataset.series = String(series.length);
  if (!points.length) { ctx.fillText("no points yet", 10, 20); return; }
  const tr = (y) => (logY && y > 0 ? Math.log10(y) : y);
  const xs = points.map((p) => p[0]), ys = points.map((p) => tr(p[1]));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5 * Math.abs(y0 || 1); y1 += 0.5 * Math.abs(y1 || 1); }
  const m = {l: 52, r: 10, t: 10, b: 24};
  const X = (x) => m.l + (x - x0) / (x1 - x0) * (w - m.l - m.r), Y = (y) => h - m.b - (tr(y) - y0) / (y1 - y0) * (h - m.t - m.b);
  ctx.strokeStyle = "#dde1e8"; ctx.beginPath();
  for (let i = 0; i <= 4; i++) {
    const yy = m.t + i * (h - m.t - m.b) / 4; ctx.moveTo(m.l, yy); ctx.lineTo(w - m.r, yy);
    const v = y1 - i * (y1 - y0) / 4; ctx.fillText(fmt(logY ? 10 ** v : v, 3), 2, yy + 4);
  }
  ctx.stroke();
  ctx.fillText(fmt(x0), m.l, h - 6); ctx.fillText("step " + fmt(x1), w - m.r - 60, h - 6);
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color || COLORS[i % COLORS.length]; ctx.lineWidth = 1.5; ctx.beginPath();
    s.points.filter(([, y]) => Number.isFinite(y)).forEach(([x, y], j) => (j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.points.length === 1) { ctx.fillStyle = ctx.strokeStyle; ctx.fillRect(X(s.points[0][0]) - 2, Y(s.points[0][1]) - 2, 4, 4); }
    if (series.length > 1) { ctx.fillStyle = ctx.strokeStyle; ctx.fillText(s.label, m.l + 8, m.t + 12 + 13 * i); }
  });
}

// ------------------------------------------------------------------ watch
async function refreshWatch() {
  const list = await api("/api/runs");
  const names = (list.runs || []).map((r) => r.name);
  const select = $("watch-run");
  if (!state.watch || !names.includes(state.watch)) state.watch = names[names.length - 1] || null;
  select.replaceChildren(...names.map((n) => new Option(n, n, false, n === state.watch)));
  if (!state.watch) { $("watch-status").textContent = "no runs yet"; return; }
  const run = await api("/api/runs/" + encodeURIComponent(state.watch));
  if (run.errors) { $("watch-error").textContent = run.errors.join("; "); return; }
  $("watch-status").textContent = run.status; $("watch-status").className = "badge " + run.status;
  $("stop").classList.toggle("hidden", run.status !== "running");
  $("resume").classList.toggle("hidden", !run.command || !["stopped", "failed"].includes(run.status));
  $("watch-error").textContent = run.error || "";
  const stats = {step: run.total_steps ? `${run.step} / ${run.total_steps}` : fmt(run.step), loss: fmt(run.loss),
    "tokens/s": run.tokens_per_s ? Math.round(run.tokens_per_s).toLocaleString("en") : "—",
    time: duration(run.seconds), "time left": run.status === "running" ? duration(run.seconds_left) : "—",
    [run.metric || "metric"]: fmt(run.value)};
  $("watch-stats").replaceChildren(...Object.entries(stats).map(([k, v]) => {
    const div = document.createElement("div"); div.innerHTML = "<dt></dt><dd></dd>";
    div.children[0].textContent = k; div.children[1].textContent = v; return div;
  }));
  plot($("loss-plot"), [{label: "loss", points: run.train.map((r) => [r.step, r.loss])}]);
  plot($("lr-plot"), [{label: "lr", points: run.train.map((r) => [r.step, r.lr])}]);
  const keys = [...new Set(run.evals.flatMap((r) => Object.keys(r)))];
  fillTable($("evals"), keys, run.evals.map((r) => Object.fromEntries(keys.map((k) => [k, fmt(r[k])]))));
  $("watch-command").textContent = run.command || "(not started from this page)";
  $("watch-resume").textContent = run.resume || "—";
  const figures = run.figures.map((f) => figure(f));
  if ($("watch-figures").dataset.shown !== run.figures.join()) { $("watch-figures").replaceChildren(...figures); $("watch-figures").dataset.shown = run.figures.join(); }
}
$("watch-run").addEventListener("change", () => { state.watch = $("watch-run").value; refreshWatch(); });
$("stop").addEventListener("click", async () => {
  const data = await api(`/api/runs/${encodeURIComponent(state.watch)}/stop`, {});
  $("watch-error").textContent = (data.errors || []).join("; ");
  refreshWatch();
});

$("resume").addEventListener("click", async () => {
  const data = await api(`/api/runs/${encodeURIComponent(state.watch)}/resume`, {});
  $("watch-error").textContent = (data.errors || []).join("; ");
  refreshWatch();
});

function figure(path) {
  const img = document.createElement("img");
  img.src = "/api/file?path=" + encodeURIComponent(path) + (TOKEN ? "&token=" + encodeURIComponent(TOKEN) : "");
  img.alt = img.title = path; img.loading = "lazy";
  return img;
}

function fillTable(table, keys, rows, sortable) {
  const head = document.createElement("tr");
  keys.forEach((k) => {
    const th = document.createElement("th"); th.textContent = k;
    if (sortable) {
      th.dataset.key = k;
      if (state.sort.key === k) th.className = "sorted" + (state.sort.asc ? " asc" : "");
      th.addEventListener("click", () => { state.sort = {key: k, asc: state.sort.key === k ? !state.sort.asc : true}; renderCompare(); });
    }
    head.append(th);
  });
  table.replaceChildren(head, ...rows.map((row) => {
    const tr = document.createElement("tr");
    keys.forEach((k) => { const td = document.createElement("td"); if (row[k] instanceof Node) td.append(row[k]); else td.textContent = row[k] ?? ""; tr.append(td); });
    return tr;
  }));
}

// ------------------------------------------------------------------ compare
const COLUMNS = ["plot", "name", "status", "task", "model", "method", "rank", "trainable", "metric", "value", "time", "step"];
async function refreshCompare() {
  const data = await api("/api/runs");
  state.rows = data.runs || [];
  renderCompare();
  const sweeps = data.sweeps || [];
  if ($("sweeps").dataset.shown !== JSON.stringify(sweeps.map((s) => s.dir))) {
    $("sweeps").dataset.shown = JSON.stringify(sweeps.map((s) => s.dir));
    $("sweeps").replaceChildren(...sweeps.map((s) => {
      const div = document.createElement("div"), h = document.createElement("h3"), pre = document.createElement("pre");
      h.textContent = `${s.kind}: ${s.dir}`; pre.className = "md"; pre.textContent = s.text;
      div.append(h, pre, ...s.figures.map(figure)); div.className = "figures"; return div;
    }));
  }
  const chosen = state.rows.filter((r) => state.checked.has(r.name));
  const series = await Promise.all(chosen.map(async (r) => {
    const run = await api("/api/runs/" + encodeURIComponent(r.name));
    return {label: r.name, points: (run.train || []).map((t) => [t.step, t.loss])};
  }));
  plot($("overlay-plot"), series);
}

function renderCompare() {
  const {key, asc} = state.sort;
  const value = (r) => ({trainable: r.trainable_share, time: r.seconds}[key] ?? r[key]);
  const rows = [...state.rows].sort((a, b) => {
    const [x, y] = [value(a), value(b)];
    if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (asc ? 1 : -1);
  });
  fillTable($("runs-table"), COLUMNS, rows.map((r) => {
    const box = document.createElement("input"); box.type = "checkbox"; box.checked = state.checked.has(r.name);
    box.addEventListener("change", () => { box.checked ? state.checked.add(r.name) : state.checked.delete(r.name); refreshCompare(); });
    return {plot: box, name: r.name, status: r.status, task: r.task, model: r.model, method: r.method, rank: fmt(r.rank),
      trainable: r.trainable_share === null ? "—" : (100 * r.trainable_share).toPrecision(3) + "%",
      metric: r.metric || "—", value: fmt(r.value), time: duration(r.seconds), step: fmt(r.step)};
  }), true);
}

// ------------------------------------------------------------------ try
async function refreshTry() {
  const data = await api("/api/adapters");
  const names = data.adapters || [];
  for (const [id, blank] of [["try-a", null], ["try-b", "(none)"]]) {
    const keep = $(id).value;
    $(id).replaceChildren(...(blank ? [new Option(blank, "")] : []), ...names.map((n) => new Option(n, n)));
    if (names.includes(keep)) $(id).value = keep;
  }
}

$("ask").addEventListener("click", async () => {
  showErrors($("try-errors"), []);
  $("answers").replaceChildren(); $("ask").disabled = true;
  const data = await api("/api/generate", {prompt: $("prompt").value, adapters: [$("try-a").value, $("try-b").value].filter(Boolean),
    max_new_tokens: $("try-max").value, temperature: $("try-temp").value, seed: $("try-seed").value});
  $("ask").disabled = false;
  showErrors($("try-errors"), data.errors);
  $("answers").replaceChildren(...(data.answers || []).map((a) => {
    const div = document.createElement("div"), h = document.createElement("h4"), pre = document.createElement("pre");
    div.className = "answer"; h.textContent = a.label; pre.textContent = a.text; div.append(h, pre); return div;
  }));
});

// ------------------------------------------------------------------ boot
(async function boot() {
  state.info = await api("/api/info");
  if (state.info.errors) { document.body.prepend(Object.assign(document.createElement("p"), {className: "errors", textContent: state.info.errors.join("; ")})); return; }
  buildForm();
  state.info.recipes.forEach((r) => $("recipe").append(new Option(r, r)));
  $("out-dir").textContent = state.info.runs_dir + "/";
  document.body.dataset.ready = "1";
})();
