// The lab page: polls /api/lab and redraws. Run text is set with textContent, never as HTML.
"use strict";
const POLL_MS = 2000;
const fmt = (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
let chart = null, chartKey = "", lastState = null;

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function header(table, names) {
  table.replaceChildren();
  const tr = document.createElement("tr");
  for (const n of names) { const th = document.createElement("th"); th.textContent = n; tr.appendChild(th); }
  table.appendChild(tr);
}

function runLink(td, runId) {
  td.textContent = "";
  const a = document.createElement("a");
  a.href = "/runs/" + encodeURIComponent(runId);
  a.textContent = runId;
  td.appendChild(a);
}

function drawBoard(s) {
  const t = document.getElementById("board");
  header(t, ["agent", "best val_bpb", "improvement over baseline", "keeps / runs", "best run"]);
  for (const b of s.leaderboard) {
    const tr = document.createElement("tr");
    cell(tr, b.agent);
    cell(tr, fmt(b.best), "num");
    cell(tr, b.improvement === null ? "–" : "−" + fmt(b.improvement), "num");
    cell(tr, b.keeps + " / " + b.runs, "num");
    const td = cell(tr, "");
    if (b.best_run) runLink(td, b.best_run);
    t.appendChild(tr);
  }
  document.getElementById("noise").textContent = s.sigma === null
    ? "noise: σ not measured yet (autoresearch-mcp calibrate)"
    : "noise: σ = " + fmt(s.sigma, 5) + " per run; a change is kept when it beats the best by more than the band";
}

function drawLive(s) {
  const t = document.getElementById("live");
  header(t, ["run", "agent", "status", "progress", "description"]);
  for (const r of s.live) {
    const tr = document.createElement("tr");
    runLink(cell(tr, ""), r.run_id);
    cell(tr, r.agent); cell(tr, r.status); cell(tr, r.progress || ""); cell(tr, r.description);
    t.appendChild(tr);
  }
}

function options(select, values) {
  const have = new Set([...select.options].map(o => o.value));
  for (const v of values) if (!have.has(v)) { const o = document.createElement("option"); o.value = o.textContent = v; select.appendChild(o); }
}

function drawRuns(s) {
  const agent = document.getElementById("agent"), status = document.getElementById("status");
  options(agent, s.leaderboard.map(b => b.agent));
  options(status, [...new Set(s.runs.map(r => r.status))].sort());
  const t = document.getElementById("runs");
  header(t, ["run", "agent", "status", "decision", "val_bpb", "delta", "z", "description"]);
  for (const r of s.runs) {
    if ((agent.value && r.agent !== agent.value) || (status.value && r.status !== status.value)) continue;
    const tr = document.createElement("tr");
    if (r.kept) tr.className = "kept";
    runLink(cell(tr, ""), r.run_id);
    cell(tr, r.agent); cell(tr, r.status); cell(tr, r.decision || "");
    cell(tr, fmt(r.val_bpb), "num"); cell(tr, r.delta === null ? "" : fmt(r.delta), "num");
    cell(tr, r.z === null ? "" : fmt(r.z, 2), "num"); cell(tr, r.description);
    t.appendChild(tr);
  }
}

function drawChart(s) {
  const agents = Object.keys(s.series);
  const n = Math.max(0, ...agents.map(a => s.series[a].length ? s.series[a][s.series[a].length - 1].x : 0));
  const xs = Array.from({ length: n }, (_, i) => i + 1);
  const data = [xs], series = [{ label: "experiment" }];
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const vals = agents.flatMap(a => s.series[a].map(p => p.val_bpb).filter(v => v !== null));
  const top = vals.length ? Math.max(...vals) : 1;
  const crashes = xs.map(() => null);
  agents.forEach((a, k) => {
    const color = palette[k % palette.length];
    const dots = xs.map(() => null), best = xs.map(() => null);
    let running = null;
    for (const p of s.series[a]) {
      if (p.val_bpb !== null) dots[p.x - 1] = p.val_bpb;
      else crashes[p.x - 1] = top;
      if (p.kept && p.val_bpb !== null) running = p.val_bpb;
      best[p.x - 1] = running;
    }
    data.push(dots, best);
    series.push({ label: a + " runs", stroke: color, paths: () => null, points: { show: true, size: 5, fill: "#fff" } });
    series.push({ label: a + " best (kept)", stroke: color, width: 2, paths: uPlot.paths.stepped({ align: 1 }),
                  points: { show: false }, spanGaps: true });
  });
  data.push(crashes);
  series.push({ label: "crashed", stroke: "#d00", paths: () => null, points: { show: true, size: 8, fill: "#d00" } });
  const key = agents.join(",");
  const el = document.getElementById("chart");
  if (chart && key === chartKey) { chart.setData(data); return; }
  if (chart) chart.destroy();
  chartKey = key;
  chart = new uPlot({ width: Math.min(1100, window.innerWidth - 40), height: 360, series,
                      scales: { x: { time: false } }, axes: [{ label: "experiment # (per agent)", incrs: [1, 2, 5, 10, 20, 50, 100] },
                      { label: "val_bpb" }] }, data, el);
}

async function poll() {
  try {
    const response = await fetch("/api/lab", { cache: "no-store" });
    if (response.ok) {
      lastState = await response.json();
      drawBoard(lastState); drawLive(lastState); drawRuns(lastState); drawChart(lastState);
      document.body.dataset.updated = String(Date.now());
    }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("agent").addEventListener("change", () => lastState && drawRuns(lastState));
document.getElementById("status").addEventListener("change", () => lastState && drawRuns(lastState));
poll();
