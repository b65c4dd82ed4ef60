// The live page of runtime.stream --ui: server-sent events in, a few fetches out. No framework, no build.
"use strict";
const $ = (id) => document.getElementById(id);
const MAX_EVENTS = 60, CHART_POINTS = 120;
const state = { info: null, prev: null, eventTimes: [], shown: {}, token: "" };
window.edgead = state;          // tests and curious operators: state.shown[seq] = when the page showed it

const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
state.token = hashToken || sessionStorage.getItem("edgead-token") || "";
$("token").value = state.token;
$("token").addEventListener("change", () => { state.token = $("token").value.trim(); sessionStorage.setItem("edgead-token", state.token); });

const fmt = (v, d = 0) => (v === null || v === undefined || Number.isNaN(v)) ? "-" : Number(v).toFixed(d);
const short = (h) => h ? String(h).slice(0, 12) : "-";

class Chart {
  constructor(canvas, colors) { this.c = canvas; this.colors = colors; this.series = colors.map(() => []); }
  push(values) {
    values.forEach((v, i) => { this.series[i].push(v); if (this.series[i].length > CHART_POINTS) this.series[i].shift(); });
    this.draw();
  }
  draw() {
    const c = this.c, g = c.getContext("2d"), w = c.width, h = c.height;
    g.clearRect(0, 0, w, h);
    const all = this.series.flat().filter((v) => v !== null && Number.isFinite(v));
    const hi = Math.max(1e-9, ...all, 0);
    this.series.forEach((s, i) => {
      g.strokeStyle = this.colors[i]; g.lineWidth = 1.5; g.beginPath();
      let started = false;
      s.forEach((v, k) => {
        if (v === null || !Number.isFinite(v)) { started = false; return; }
        const x = w - (s.length - 1 - k) * (w / (CHART_POINTS - 1)), y = h - 4 - (v / hi) * (h - 16);
        if (started) g.lineTo(x, y); else { g.moveTo(x, y); started = true; }
      });
      g.stroke();
    });
    g.fillStyle = "#8a94a3"; g.font = "10px sans-serif"; g.fillText(fmt(hi, hi < 10 ? 1 : 0), 3, 10);
  }
}
const charts = { rate: new Chart($("chart-rate"), ["#4fd18b"]), latency: new Chart($("chart-latency"), ["#5fb3ff", "#ff9f43"]),
                 drops: new Chart($("chart-drops"), ["#ff5a4f"]) };

function showIdentity(info) {
  state.info = info;
  $("identity").textContent = `model ${info.model} | ${info.backend} | ${info.path} | artifact sha256 ${short(info.artifact_sha256)} ` +
    `| metadata sha256 ${short(info.metadata_sha256)} | format ${info.format_version} | parity ${info.parity || "not recorded"} ` +
    `| thresholds from ${info.threshold_source}`;
}

function showStatus(s) {
  const p = state.prev;
  let rate = null, drops = null;
  if (p && s.elapsed_s > p.elapsed_s) {
    const dt = s.elapsed_s - p.elapsed_s;
    rate = (s.lines_scored - p.lines_scored) / dt;
    drops = (s.lines_dropped - p.lines_dropped) / dt;
  }
  state.prev = s;
  $("lines-per-s").textContent = rate === null ? fmt(s.lines_per_s) : fmt(rate);
  $("latency").textContent = `${fmt(s.latency_ms.p50)} / ${fmt(s.latency_ms.p99)} ms`;
  $("lines").textContent = `${s.lines_in} / ${s.lines_scored}`;
  const d = Object.entries(s.dropped).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`).join(", ");
  $("dropped").textContent = `${s.lines_dropped}${d ? " (" + d + ")" : ""}`;
  $("event-count").textContent = s.events;
  const sinks = Object.entries(s.sinks || {}).map(([k, c]) => `${k} ${c.written}` + (c.dropped + c.failed + c.abandoned ? ` (lost ${c.dropped + c.failed + c.abandoned})` : ""));
  $("sinks").textContent = sinks.join(", ") || "-";
  $("pixel-now").textContent = fmt(s.pixel_threshold, 4);
  $("image-now").textContent = s.image_threshold === null ? "graph (normalized >= 0.5)" : fmt(s.image_threshold, 4);
  if (document.activeElement !== $("pixel-threshold") && $("pixel-threshold").value === "") $("pixel-threshold").value = s.pixel_threshold;
  $("paused").hidden = !s.paused;
  const now = Date.now() / 1000;
  state.eventTimes = state.eventTimes.filter((t) => now - t < 60);
  $("event-rate").textContent = state.eventTimes.length;
  if (rate !== null) { charts.rate.push([rate]); charts.drops.push([drops]); }
  charts.latency.push([s.latency_ms.p50, s.latency_ms.p99]);
}

function showEvent(m) {
  const e = m.event;
  if (state.shown[e.seq]) return;
  const li = document.createElement("li");
  li.dataset.seq = e.seq;
  const img = m.crop ? `<img src="${m.crop}" alt="event ${e.seq}">` : "";
  const mm = e.position_mm !== undefined ? `<br>at ${fmt(e.position_mm / 1000, 3)} m, ${fmt(e.length_mm, 1)} x ${fmt(e.width_mm, 1)} mm` : "";
  const t = e.t_capture ? new Date(e.t_capture * 1000).toLocaleTimeString() : "-";
  li.innerHTML = `${img}<div><b>#${e.seq}</b> lines ${e.line_start}-${e.line_end}<br>cols ${e.col_start}-${e.col_end}, ` +
    `${e.area_px} px, peak ${fmt(e.peak_score, 3)}${mm}<br><span class="sub">captured ${t}</span></div>`;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  state.shown[e.seq] = Date.now() / 1000;
  state.eventTimes.push(Date.now() / 1000);
}

function showControl(c) {
  const li = document.createElement("li");
  const what = c.control === "thresholds" ? `pixel ${fmt(c.pixel_threshold, 4)}, image ${c.image_threshold === null ? "graph" : fmt(c.image_threshold, 4)}`
    : c.control === "save" ? `saved to ${c.sidecar}` : "";
  li.textContent = `${c.time} ${c.control} ${what} by ${c.by}` + (c.from_line !== null && c.from_line !== undefined ? ` from line ${c.from_line}` : "");
  $("controls").prepend(li);
}

let stripBusy = false, stripWanted = -1;
function loadStrip(v) {
  stripWanted = v;
  if (stripBusy) return;
  stripBusy = true;
  fetch(`/api/strip.jpg?v=${v}`, { cache: "no-store" }).then(async (r) => {
    if (r.status === 200) {
      const meta = JSON.parse(r.headers.get("X-Strip") || "{}");
      const url = URL.createObjectURL(await r.blob());
      const img = $("strip"), old = img.src;
      img.onload = () => { if (old.startsWith("blob:")) URL.revokeObjectURL(old); img.dataset.v = v; };
      img.src = url;
      if (meta.last_line !== null && meta.last_line !== undefined)
        $("strip-range").textContent = `lines ${meta.first_line}-${meta.last_line} (1 row = ${meta.ky} lines, 1 px = ${meta.kx} px)`;
    }
  }).catch(() => {}).finally(() => { stripBusy = false; if (stripWanted !== v) loadStrip(stripWanted); });
}

async function control(path, body) {
  $("msg").textContent = "";
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json", "Authorization": `Bearer ${state.token}` },
                                body: JSON.stringify(body || {}) });
  const j = await r.json().catch(() => ({}));
  $("msg").textContent = r.ok ? (j.saved ? `saved: ${j.saved}` : "sent") : `refused (${r.status}): ${j.error || ""}`;
  return r.ok;
}
$("apply").onclick = () => {
  const body = {}, p = $("pixel-threshold").value, i = $("image-threshold").value;
  if (p !== "") body.pixel_threshold = Number(p);
  if (i !== "") body.image_threshold = Number(i); else body.clear_image_threshold = true;
  return control("/api/thresholds", body);
};
$("pause").onclick = () => control("/api/pause");
$("resume").onclick = () => control("/api/resume");
$("save").onclick = () => control("/api/save");

async function start() {
  const st = await (await fetch("/api/state", { cache: "no-store" })).json();
  showIdentity(st.info);
  st.controls.forEach(showControl);
  st.events.forEach(showEvent);
  showStatus(st.status);
  $("save").disabled = !st.save_possible;
  const es = new EventSource(`/api/stream?since=${st.seq}`);
  es.onopen = () => {
    $("conn").textContent = "live"; $("conn").className = "badge on";
    if (!state.openedAt) state.openedAt = Date.now() / 1000;     // events shown live from here on
  };
  es.onerror = () => { $("conn").textContent = "reconnecting"; $("conn").className = "badge off"; };
  es.onmessage = (msg) => {
    const m = JSON.parse(msg.data);
    if (m.type === "status") showStatus(m.status);
    else if (m.type === "event") showEvent(m);
    else if (m.type === "control") showControl(m.control);
    else if (m.type === "strip") loadStrip(m.v);
  };
}
start();
