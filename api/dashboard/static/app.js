/* hwprune dashboard: plain JavaScript, no build step. Talks to the v1 API with the key from sessionStorage.
 * Live progress comes from GET /v1/jobs/{id}/events read with fetch() + a stream reader (EventSource cannot
 * send an Authorization header, and the key must never go into a URL). Charts: vendored Chart.js (MIT). */
"use strict";

const KEY = "hwprune.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (sel) => document.querySelector(sel);
const state = { filter: "", cursor: null, streams: new Map(), charts: {}, models: new Map(), jobView: null };

// ---------------------------------------------------------------- API helpers
function key() { return sessionStorage.getItem(KEY); }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {}, { Authorization: "Bearer " + key() });
  const res = await fetch(path, Object.assign({}, opts, { headers }));
  if (res.status === 401) { sessionStorage.removeItem(KEY); route(); throw new Error("API key rejected"); }
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { const p = await res.json(); msg = p.detail || p.title || msg; } catch (_) { /* not JSON */ }
    throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
  }
  return res;
}
const getJSON = async (path) => (await api(path)).json();

/* Server-Sent Events over fetch: parse "event:" / "data:" blocks separated by a blank line. Resolves when the
 * server ends the stream (it does after the terminal state) or the AbortSignal fires. */
async function streamEvents(path, onEvent, signal) {
  const res = await api(path, { headers: { Accept: "text/event-stream" }, signal });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      let event = "message"; const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

/* Follow one job until it is terminal; reconnect (after 2 s) only if the connection drops early. */
function follow(jobId, onJob) {
  if (state.streams.has(jobId)) return;
  const ctl = new AbortController();
  state.streams.set(jobId, ctl);
  (async () => {
    let last = null;
    while (!ctl.signal.aborted) {
      try {
        await streamEvents(`/v1/jobs/${jobId}/events`, (_ev, job) => { last = job; onJob(job); }, ctl.signal);
      } catch (e) { if (ctl.signal.aborted) break; }
      if (last && TERMINAL.has(last.status)) break;
      await new Promise((r) => setTimeout(r, 2000));
    }
    state.streams.delete(jobId);
  })();
}
function stopStreams() { for (const c of state.streams.values()) c.abort(); state.streams.clear(); }

// ---------------------------------------------------------------- formatting
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pct = (x) => (x == null ? "–" : (100 * x).toFixed(1) + "%");
const ms = (x) => (x == null ? "–" : Number(x) < 1 ? Number(x).toPrecision(3) : Number(x).toFixed(2));
const num = (x, d = 2) => (x == null || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
function human(n) {
  if (n == null) return "–";
  const u = ["", "K", "M", "G", "T"]; let i = 0; n = Number(n);
  while (Math.abs(n) >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return n.toFixed(i ? 2 : 0) + u[i];
}
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; n = Number(n);
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const badge = (s) => `<span class="badge ${esc(s)}" data-status="${esc(s)}">${esc(s)}</span>`;

// ---------------------------------------------------------------- routing
function show(view) {
  for (const el of document.querySelectorAll(".view")) el.hidden = el.id !== "view-" + view;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("on", a.dataset.view === view);
}

function route() {
  stopStreams();
  Object.values(state.charts).forEach((c) => c.destroy()); state.charts = {};
  const authed = !!key();
  $("#nav").hidden = !authed; $("#logout").hidden = !authed;
  if (!authed) { show("login"); $("#key").focus(); return; }
  const [, view, arg] = (location.hash || "#/jobs").split("/");
  if (view === "job" && arg) { show("job"); loadJob(decodeURIComponent(arg)); }
  else if (view === "submit") { show("submit"); loadSubmit(); }
  else if (view === "compare") { show("compare"); loadCompare(arg ? decodeURIComponent(arg) : null); }
  else { show("jobs"); loadJobs(true); }
}

// ---------------------------------------------------------------- login
$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const k = $("#key").value.trim();
  const res = await fetch("/v1/jobs?limit=1", { headers: { Authorization: "Bearer " + k } });
  if (!res.ok) { $("#login-error").textContent = "That key was not accepted (" + res.status + ")."; return; }
  sessionStorage.setItem(KEY, k); $("#key").value = ""; $("#login-error").textContent = "";
  route();
});
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.hash = "#/jobs"; route(); });

// ---------------------------------------------------------------- models cache
async function loadModels() {
  const page = await getJSON("/v1/models?limit=200");
  state.models = new Map(page.items.map((m) => [m.id, m]));
  return page.items;
}

// ---------------------------------------------------------------- jobs list
function jobRow(j) {
  const m = state.models.get(j.model_id);
  return `<td><a href="#/job/${esc(j.id)}"><code>${esc(j.id.slice(-10))}</code></a></td>
    <td>${esc(m ? m.name : j.model_id.slice(-10))}</td><td>${esc(j.method)}</td><td>${esc(j.granularity)}</td>
    <td>${badge(j.status)}</td>
    <td><div class="bar" title="${pct(j.progress)}"><div style="width:${(100 * j.progress).toFixed(1)}%"></div></div></td>
    <td>${esc(j.stage || "")}</td><td>${j.speedup == null ? "–" : num(j.speedup) + "×"}</td><td>${when(j.created_at)}</td>`;
}

function upsertRow(j) {
  const tbody = $("#jobs-table tbody");
  let tr = tbody.querySelector(`tr[data-id="${j.id}"]`);
  if (state.filter && j.status !== state.filter && !tr) return;
  if (!tr) { tr = document.createElement("tr"); tr.dataset.id = j.id; tbody.prepend(tr); }
  tr.dataset.status = j.status;
  tr.innerHTML = jobRow(j);
  $("#jobs-empty").hidden = true;
}

async function loadJobs(reset) {
  if (reset) { state.cursor = null; $("#jobs-table tbody").innerHTML = ""; }
  await loadModels();
  const q = new URLSearchParams({ limit: "50" });
  if (state.filter) q.set("status", state.filter);
  if (state.cursor) q.set("cursor", state.cursor);
  const page = await getJSON("/v1/jobs?" + q);
  const tbody = $("#jobs-table tbody");
  for (const j of page.items) {
    const tr = document.createElement("tr"); tr.dataset.id = j.id; tr.dataset.status = j.status;
    tr.innerHTML = jobRow(j); tbody.append(tr);
    if (!TERMINAL.has(j.status)) follow(j.id, upsertRow);
  }
  state.cursor = page.next_cursor;
  $("#jobs-more").hidden = !page.next_cursor;
  $("#jobs-empty").hidden = tbody.children.length > 0;
}
$("#jobs-more").addEventListener("click", () => loadJobs(false));
$("#filters").addEventListener("click", (e) => {
  const b = e.target.closest("button"); if (!b) return;
  for (const x of $("#filters").children) x.classList.toggle("on", x === b);
  state.filter = b.dataset.status; stopStreams(); loadJobs(true);
});

// ---------------------------------------------------------------- submit
async function loadSubmit() {
  const [models, datasets, accels] = await Promise.all([loadModels(), getJSON("/v1/datasets?limit=200"),
    getJSON("/v1/accelerators")]);
  const sel = $("#f-model"), keep = sel.value;
  sel.innerHTML = models.map((m) => `<option value="${esc(m.id)}">${esc(m.name)} · ${human(m.params)} params · ${esc(m.id.slice(-6))}</option>`).join("");
  if (keep && state.models.has(keep)) sel.value = keep;
  $("#f-dataset").innerHTML = `<option value="">none (synthetic inputs, distillation)</option>` +
    datasets.items.map((d) => `<option value="${esc(d.id)}">${esc(d.name)} · ${d.samples} samples${d.has_labels ? " · labelled" : ""}</option>`).join("");
  $("#f-accel").innerHTML = accels.map((a) => `<option value="${esc(a.name)}">${esc(a.name)} — ${esc(a.description)}</option>`).join("") +
    `<option value="__custom">custom block shape…</option>`;
}
$("#f-accel").addEventListener("change", () => { $("#custom-block").hidden = $("#f-accel").value !== "__custom"; });
$("#f-method").addEventListener("change", () => {
  if ($("#f-method").value === "3d") $("#f-target-kind").value = "flops";
});

$("#upload-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = $("#upload-file").files[0]; if (!f) return;
  const fd = new FormData(); fd.append("file", f, f.name);
  if ($("#upload-shape").value.trim()) fd.append("input_shape", $("#upload-shape").value.trim());
  $("#upload-status").textContent = "Uploading " + f.name + "…";
  try {
    const m = await (await api("/v1/models", { method: "POST", body: fd })).json();
    $("#upload-status").textContent = `Uploaded ${m.name}: ${human(m.params)} params, ${human(m.macs)} MACs.`;
    await loadSubmit(); $("#f-model").value = m.id;
  } catch (err) { $("#upload-status").textContent = "Upload failed: " + err.message; }
});

$("#dataset-upload").addEventListener("click", async () => {
  const f = $("#dataset-file").files[0]; if (!f) return;
  const fd = new FormData(); fd.append("file", f, f.name);
  $("#dataset-status").textContent = "Uploading " + f.name + "…";
  try {
    const d = await (await api("/v1/datasets", { method: "POST", body: fd })).json();
    $("#dataset-status").textContent = `Uploaded ${d.name}: ${d.samples} samples.`;
    await loadSubmit(); $("#f-dataset").value = d.id;
  } catch (err) { $("#dataset-status").textContent = "Upload failed: " + err.message; }
});

$("#job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { model_id: $("#f-model").value, method: $("#f-method").value };
  if ($("#f-granularity").value) body.granularity = $("#f-granularity").value;
  if ($("#f-accel").value === "__custom") {
    body.accelerator = { name: "custom", block_shape: [Number($("#f-block-r").value), Number($("#f-block-c").value)] };
    body.granularity = body.granularity || "block";
  } else body.accelerator = $("#f-accel").value;
  const target = Number($("#f-target").value);
  if ($("#f-target-kind").value === "flops") body.flops_target = target; else body.target_sparsity = target;
  if ($("#f-steps").value !== "") body.steps = Number($("#f-steps").value);
  if ($("#f-dataset").value) body.dataset_id = $("#f-dataset").value;
  try {
    if ($("#f-extra").value.trim()) Object.assign(body, JSON.parse($("#f-extra").value));
  } catch (err) { $("#job-status").textContent = "More parameters: not valid JSON (" + err.message + ")"; return; }
  $("#job-status").textContent = "Submitting…";
  try {
    const job = await (await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) })).json();
    $("#job-status").textContent = "Submitted job " + job.id;
    location.hash = "#/jobs";
  } catch (err) { $("#job-status").textContent = "Refused: " + err.message; }
});

// ---------------------------------------------------------------- job page
function setProgress(j) {
  $("#job-badge").outerHTML = `<span id="job-badge">${badge(j.status)}</span>`;
  $("#job-stage").textContent = j.stage ? "stage: " + j.stage : (j.status === "queued" ? "waiting for a worker" : "");
  $("#job-pct").textContent = pct(j.progress);
  $("#job-bar").style.width = (100 * j.progress).toFixed(1) + "%";
  $("#job-error").textContent = j.error || "";
  $("#job-cancel").hidden = TERMINAL.has(j.status);
  $("#dl-onnx").hidden = $("#dl-report").hidden = j.status !== "succeeded";
}

async function loadJob(id) {
  state.jobView = id;
  $("#job-results").hidden = true; $("#dl-status").textContent = "";
  await loadModels();
  const j = await getJSON(`/v1/jobs/${id}`);
  const m = state.models.get(j.model_id);
  $("#job-title").textContent = `${m ? m.name : "model"} · ${j.method} · ${j.granularity} · ${j.id.slice(-10)}`;
  setProgress(j);
  if (j.status === "succeeded") return showResults(j);
  if (TERMINAL.has(j.status)) return;
  follow(id, (job) => {
    if (state.jobView !== id) return;
    setProgress(job);
    if (job.status === "succeeded") showResults(job);
  });
}
$("#job-cancel").addEventListener("click", async () => {
  try { setProgress(await (await api(`/v1/jobs/${state.jobView}/cancel`, { method: "POST" })).json()); }
  catch (err) { $("#job-error").textContent = err.message; }
});

async function download(name) {
  $("#dl-status").textContent = "Downloading " + name + "…";
  const blob = await (await api(`/v1/jobs/${state.jobView}/artifacts/${name}`)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a"); a.href = url; a.download = `${state.jobView}-${name}`;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  $("#dl-status").textContent = `${name}: ${bytes(blob.size)}`;
}
$("#dl-onnx").addEventListener("click", () => download("model.onnx").catch((e) => { $("#dl-status").textContent = e.message; }));
$("#dl-report").addEventListener("click", () => download("report.json").catch((e) => { $("#dl-status").textContent = e.message; }));

/* Size of the pruned file without downloading it: read Content-Length, then cancel the body. */
async function artifactSize(id, name) {
  const res = await api(`/v1/jobs/${id}/artifacts/${name}`);
  const n = res.headers.get("content-length");
  try { await res.body.cancel(); } catch (_) { /* already closed */ }
  return n == null ? null : Number(n);
}

function card(title, main, sub) {
  return `<div class="card"><h2>${esc(title)}</h2><div class="metric">${main}</div><div class="sub">${sub}</div></div>`;
}

function chart(id, config) {
  if (state.charts[id]) state.charts[id].destroy();
  config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options || {});
  state.charts[id] = new Chart(document.getElementById(id), config);
}

async function showResults(j) {
  if (state.jobView !== j.id || !$("#job-results").hidden) return;
  const report = await (await api(`/v1/jobs/${j.id}/artifacts/report.json`)).json();
  const m = state.models.get(j.model_id);
  const prunedSize = await artifactSize(j.id, "model.onnx").catch(() => null);
  const lat = report.latency_ms || {}, dl = lat.dense || {}, pl = lat.pruned || {};
  const fid = report.fidelity || {};
  $("#job-cards").innerHTML = [
    card("Latency (median)", `${ms(dl.median)} → ${ms(pl.median)} ms`,
      `speedup ${num(report.speedup)}× · ${esc(pl.provider || "")} · ${pl.threads ?? "?"} threads · ${pl.runs ?? "?"} runs`),
    card("MACs", `${human(report.macs?.dense)} → ${human(report.macs?.pruned)}`,
      `ratio ${num(report.macs?.ratio, 3)} · effective ${human(report.macs?.effective)}`),
    card("Parameters", `${human(report.params?.dense)} → ${human(report.params?.pruned)}`,
      `non-zero ${human(report.params?.nonzero)} · sparsity ${pct(report.achieved_sparsity)} (target ${pct(report.target_sparsity)})`),
    card("Size (ONNX)", `${bytes(m?.size_bytes)} → ${bytes(prunedSize)}`, "uploaded model → pruned model.onnx"),
  ].join("");
  const rows = [["top-1 agreement", pct(fid.top1_agreement)], ["cosine", num(fid.cosine, 4)],
    ["relative L2", num(fid.rel_l2, 4)], ["held-out samples", `${fid.samples ?? "–"} (${esc(fid.inputs || "")})`]];
  const acc = report.accuracy;
  if (acc != null && typeof acc === "object") for (const [k, v] of Object.entries(acc)) rows.push(["accuracy " + k, typeof v === "number" ? (k === "samples" ? String(v) : pct(v)) : esc(JSON.stringify(v))]);
  else rows.push(["accuracy", acc == null ? "– (no labelled dataset)" : pct(acc)]);
  $("#job-fidelity").innerHTML = rows.map(([k, v]) => `<tr><th>${esc(k)}</th><td>${v}</td></tr>`).join("");
  $("#job-explain").textContent = (report.explain && report.explain.summary) || "–";
  $("#job-results").hidden = false;

  const layers = (report.layers || []).filter((l) => l.sparsity != null);
  chart("chart-layers", { type: "bar", data: { labels: layers.map((l) => l.name),
    datasets: [{ label: "sparsity", data: layers.map((l) => l.sparsity), backgroundColor: "#2563eb" }] },
    options: { scales: { y: { min: 0, max: 1, title: { display: true, text: "fraction of weights removed" } } },
      plugins: { legend: { display: false } } } });

  const hist = report.training && report.training.history;
  $("#card-training").hidden = !(hist && hist.length);
  if (hist && hist.length) {
    chart("chart-training", { type: "line", data: { labels: hist.map((h) => h.step), datasets: [
      { label: "temperature τ", data: hist.map((h) => h.tau), borderColor: "#b54708", yAxisID: "tau", pointRadius: 0 },
      { label: "kept fraction", data: hist.map((h) => h.kept_fraction), borderColor: "#2563eb", yAxisID: "kept", pointRadius: 0 },
      { label: "fractional (soft) mass", data: hist.map((h) => h.fractional), borderColor: "#15803d", yAxisID: "kept", pointRadius: 0, borderDash: [4, 3] },
    ] }, options: { scales: { x: { title: { display: true, text: "step" } },
      tau: { position: "left", type: "logarithmic", title: { display: true, text: "τ" } },
      kept: { position: "right", min: 0, max: 1, grid: { drawOnChartArea: false }, title: { display: true, text: "fraction" } } } } });
  }

  const p3 = report.plan3d;
  $("#card-3d").hidden = !p3;
  if (p3) {
    const samples = (p3.samples || []).map((s) => ({ x: s.macs, y: s.score, d: s.d, w: s.w, r: s.r }));
    const chosenY = typeof p3.achieved === "number" ? p3.achieved : (p3.achieved?.score ?? p3.predicted);
    const chosen = [{ x: p3.macs?.pruned, y: chosenY, d: p3.depth, w: p3.width, r: p3.resolution }];
    chart("chart-3d", { type: "scatter", data: { datasets: [
      { label: "samples", data: samples, backgroundColor: "#98a2b3" },
      { label: "chosen", data: chosen, backgroundColor: "#b42318", borderColor: "#b42318", borderWidth: 3,
        pointRadius: 9, pointStyle: "crossRot" } ] },
      options: { scales: { x: { title: { display: true, text: "MACs" } }, y: { title: { display: true, text: p3.score_metric || "score" } } },
        plugins: { tooltip: { callbacks: { label: (c) => `d=${num(c.raw.d)} w=${num(c.raw.w)} r=${num(c.raw.r)}: ${human(c.raw.x)} MACs, score ${num(c.raw.y, 4)}` } } } } });
    $("#plan3d-note").textContent = `Chosen kept fractions: depth ${num(p3.depth)}, width ${num(p3.width)}, ` +
      `resolution ${num(p3.resolution)} (input ${(p3.input_shape || []).join("×")}); predicted score ` +
      `${num(p3.predicted, 4)}, achieved ${num(typeof p3.achieved === "number" ? p3.achieved : chosenY, 4)}. ${p3.resize_note || ""}`;
  }
}

// ---------------------------------------------------------------- comparison
async function loadCompare(modelId) {
  const models = await loadModels();
  const sel = $("#cmp-model");
  sel.innerHTML = models.map((m) => `<option value="${esc(m.id)}">${esc(m.name)} · ${esc(m.id.slice(-6))}</option>`).join("");
  if (modelId && state.models.has(modelId)) sel.value = modelId;
  if (!sel.value) return;
  const page = await getJSON(`/v1/jobs?limit=200&status=succeeded&model_id=${encodeURIComponent(sel.value)}`);
  const yKey = $("#cmp-y").value;
  const yOf = (j) => {
    const met = j.metrics || {};
    if (yKey === "accuracy") { const a = met.accuracy; return typeof a === "number" ? a : (a && typeof a.pruned === "number" ? a.pruned : null); }
    return met.fidelity ? met.fidelity[yKey === "top1" ? "top1_agreement" : "cosine"] : null;
  };
  const pts = page.items.map((j) => ({ x: j.metrics?.latency_ms?.pruned, y: yOf(j), id: j.id, j }))
    .filter((p) => p.x != null && p.y != null);
  if (!pts.length && yKey === "accuracy" && page.items.length) {  // no labelled data: fall back to fidelity
    $("#cmp-y").value = "top1"; return loadCompare(sel.value);
  }
  const dense = page.items.map((j) => j.metrics?.latency_ms?.dense).filter((x) => x != null);
  const datasets = [{ label: "pruned jobs", data: pts, backgroundColor: "#2563eb", pointRadius: 6 }];
  if (dense.length && yKey !== "accuracy") {
    datasets.push({ label: "dense (median over jobs)", pointStyle: "rectRot", pointRadius: 8, backgroundColor: "#101828",
      data: [{ x: dense.sort((a, b) => a - b)[Math.floor(dense.length / 2)], y: 1, id: null }] });
  }
  chart("chart-compare", { type: "scatter", data: { datasets }, options: {
    scales: { x: { title: { display: true, text: "latency, median (ms)" } },
      y: { title: { display: true, text: $("#cmp-y").selectedOptions[0].text } } },
    onClick: (_e, els) => { const p = els[0] && datasets[els[0].datasetIndex].data[els[0].index]; if (p && p.id) location.hash = "#/job/" + p.id; },
    plugins: { tooltip: { callbacks: { label: (c) => c.raw.j ? `${c.raw.j.method} ${c.raw.j.granularity} s=${pct(c.raw.j.achieved_sparsity)}: ${num(c.raw.x)} ms, ${num(c.raw.y, 4)}` : `dense: ${num(c.raw.x)} ms` } } } } });
  $("#cmp-table tbody").innerHTML = page.items.map((j) => `<tr><td><a href="#/job/${esc(j.id)}"><code>${esc(j.id.slice(-10))}</code></a></td>
    <td>${esc(j.method)}</td><td>${esc(j.granularity)}</td><td>${pct(j.achieved_sparsity)}</td>
    <td>${ms(j.metrics?.latency_ms?.dense)} → ${ms(j.metrics?.latency_ms?.pruned)}</td><td>${num(j.speedup)}×</td>
    <td>${pct(j.metrics?.fidelity?.top1_agreement)}</td><td>${yOf(Object.assign({}, j)) != null && yKey === "accuracy" ? pct(yOf(j)) : "–"}</td></tr>`).join("");
  $("#chart-compare").dataset.points = String(pts.length);
}
$("#cmp-model").addEventListener("change", () => { location.hash = "#/compare/" + encodeURIComponent($("#cmp-model").value); });
$("#cmp-y").addEventListener("change", () => loadCompare($("#cmp-model").value));

// ---------------------------------------------------------------- boot
window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (e) => { console.error(e.reason); });
route();
