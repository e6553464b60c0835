/* Hedgerow dashboard: polls the gateway's APIs with the operator's admin key and draws what they say.

The page holds no data. /api/v1/providers and /metrics are polled every 2 s and their values accumulated here,
in the tab, into time series (the APIs answer "now"; the history is the page's). Rankings, activity and keys are
store queries that change slowly: every 15 s. An API that is missing (404: an older gateway, metrics off) or
refused puts a note in its panel and is asked again later; nothing here throws for it. Data is put into the page
as text nodes only (key labels and model names come from clients). Charts are inline SVG drawn below. */
"use strict";

const FAST_MS = 2000; // providers and /metrics: the live view
const SLOW_MS = 15000; // rankings, activity, keys: each a store query; they move slowly
const ABSENT_MS = 60000; // an API that answered 404 is asked again this rarely (it may arrive with an upgrade)
const KEEP_S = 15 * 60; // live history kept and drawn
const DAYS = 30; // activity window
const KEY_ITEM = "hedgerow.dashboard.key";
const SVG_NS = "http://www.w3.org/2000/svg";
// prettier-ignore
const PALETTE = [
  "#2f6fdf", "#16a34a", "#e08a00", "#9333ea", "#dc2626", "#0891b2", "#db2777", "#65a30d", "#7c5cff", "#ea580c", "#0d9488", "#a16207",
];
const STATUS_COLORS = { "2xx": "#16a34a", "3xx": "#0891b2", "4xx": "#e08a00", "5xx": "#dc2626", "1xx": "#6b7280" };
// Outcomes that count against an upstream (health/window.py): client errors and cancellations do not.
const FAILURES = ["connect", "timeout", "rate_limited", "server_error", "protocol"];

// ---- formatting ----------------------------------------------------------------------------------------------
const intFormat = new Intl.NumberFormat("en-US");
const compactFormat = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
const usdFormat = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
const DASH = "—";

const fmt = {
  int: (v) => (v == null ? DASH : intFormat.format(v)),
  compact: (v) => (v == null ? DASH : compactFormat.format(v)),
  /** seconds → "4.2 ms", "312 ms", "1.25 s" */
  ms(s) {
    if (s == null) return DASH;
    const ms = s * 1000;
    if (ms < 10) return ms.toFixed(1) + " ms";
    if (ms < 1000) return Math.round(ms) + " ms";
    return s.toFixed(2) + " s";
  },
  /** USD: cents above a dollar, three significant digits below ("$0.00412") */
  usd(v) {
    if (v == null) return DASH;
    if (v === 0) return "$0.00";
    if (Math.abs(v) >= 1) return usdFormat.format(v);
    const decimals = Math.min(8, 2 - Math.floor(Math.log10(Math.abs(v))));
    return (v < 0 ? "-$" : "$") + Math.abs(v).toFixed(decimals);
  },
  /** axis labels: round steps, no trailing zeros ("$0.02", "$2.50") */
  usdAxis: (v) => (v >= 1 ? usdFormat.format(v) : "$" + Number(v.toPrecision(3))),
  pct: (r, digits = 1) => (r == null ? DASH : (r * 100).toFixed(digits) + "%"),
  pctAxis: (r) => Number((r * 100).toFixed(1)) + "%",
  tps: (v) => (v == null ? DASH : v.toFixed(v < 10 ? 1 : 0) + " tok/s"),
  rate: (v) => (v == null ? DASH : v < 10 ? String(Number(v.toFixed(2))) : intFormat.format(Math.round(v))),
  duration(s) {
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  },
  clock: (t) => new Date(t * 1000).toLocaleTimeString("en-GB"),
};

// ---- DOM -----------------------------------------------------------------------------------------------------
const $ = (sel, root = document) => root.querySelector(sel);

/** An element; string children become text nodes (never parsed as HTML). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, v);
  }
  for (const child of children) if (child != null) el.append(child);
  return el;
}

function s(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.append(el);
  return el;
}

function swatch(color) {
  const el = h("span", { class: "sw" });
  el.style.background = color; // CSSOM, which the page's Content-Security-Policy allows (style attributes it does not)
  return el;
}

/** A bar for a share or a used fraction: in `color`, or amber then red as a limit nears. */
function meter(ratio, color = null) {
  const fill = h("span", { class: "fill" + (color ? "" : ratio >= 0.9 ? " bad" : ratio >= 0.75 ? " warn" : "") });
  if (color) fill.style.background = color;
  fill.style.width = Math.max(0, Math.min(1, ratio)) * 100 + "%";
  return h(
    "span",
    { class: "meter" },
    h("span", { class: "track" }, fill),
    h("span", { class: "pct" }, fmt.pct(ratio, 0)),
  );
}

function tile(id, value, sub, bad = false) {
  const el = document.getElementById(id);
  $(".value", el).textContent = value;
  if (sub != null) $(".sub", el).textContent = sub;
  el.classList.toggle("bad", bad);
}

/** A table cell; `value` (the raw number) is kept in data-v so what is shown can be checked against the API. */
function td(text, { cls = "num", key = null, value = null } = {}) {
  return h("td", { class: cls, "data-k": key, "data-v": value }, text);
}

function fillTable(card, rows, columns) {
  const body = $("tbody", card);
  body.replaceChildren(
    ...(rows.length ? rows : [h("tr", {}, h("td", { class: "empty", colspan: columns }, "no data yet"))]),
  );
}

function setNote(card, text, absent = false) {
  $(".note", card).textContent = text;
  card.classList.toggle("absent", absent);
}

// ---- colours: one per endpoint and one per model, stable while the page is open ------------------------------
const colors = { endpoints: new Map(), models: new Map() };
function colorOf(map, name) {
  if (!map.has(name)) map.set(name, PALETTE[map.size % PALETTE.length]);
  return map.get(name);
}

// ---- charts --------------------------------------------------------------------------------------------------
const MARGIN = { left: 58, right: 12, top: 8, bottom: 22 };

const TICKS = 4; // horizontal grid lines above the baseline

/** The top of a y axis over [0, max]: TICKS steps of 1, 2, 2.5 or 5 × 10ⁿ, and at least `minStep` each. */
function axisTop(max, minStep = 0) {
  const want = Math.max(max / TICKS, minStep) || 0.25; // no data at all: 0 to 1
  const p = 10 ** Math.floor(Math.log10(want));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((st) => st >= want * 0.9999);
  return step * TICKS;
}

function frame(svg) {
  const w = svg.clientWidth || 400;
  const hgt = svg.clientHeight || 170;
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.replaceChildren();
  return { w, h: hgt, x0: MARGIN.left, x1: w - MARGIN.right, y0: hgt - MARGIN.bottom, y1: MARGIN.top };
}

function yAxis(svg, f, top, format) {
  for (let i = 0; i <= TICKS; i++) {
    const y = f.y0 - ((f.y0 - f.y1) * i) / TICKS;
    s("line", { x1: f.x0, x2: f.x1, y1: y, y2: y, class: i ? "grid" : "axis" }, svg);
    s("text", { x: f.x0 - 8, y: y + 4, class: "y" }, svg).textContent = i ? format((top * i) / TICKS) : "0";
  }
}

function empty(svg, f, text) {
  s("text", { x: (f.x0 + f.x1) / 2, y: (f.y0 + f.y1) / 2, class: "empty" }, svg).textContent = text;
}

/** Lines over time. lines: [{label, color, dashed, points: [[t, v|null], …]}]; bands: [[from, to], …] shaded. */
function lineChart(svg, lines, { format, now, bands = [], minStep = 0, emptyText = "waiting for data" }) {
  const f = frame(svg);
  let first = now;
  let max = 0;
  for (const line of lines) {
    for (const [t, v] of line.points) {
      if (v == null) continue;
      first = Math.min(first, t);
      max = Math.max(max, v);
    }
  }
  const span = Math.min(KEEP_S, Math.max(30, now - first)); // zoom to the data: 30 s at least, KEEP_S at most
  const top = axisTop(max, minStep);
  const x = (t) => f.x1 - ((f.x1 - f.x0) * (now - t)) / span;
  const y = (v) => f.y0 - ((f.y0 - f.y1) * v) / top;
  yAxis(svg, f, top, format);
  const step = [5, 10, 15, 30, 60, 120, 300, 600].find((st) => span / st <= 5) || 900;
  for (let ago = 0; ago <= span; ago += step) {
    const label = ago === 0 ? "now" : "−" + (ago < 60 ? ago + "s" : ago / 60 + "m");
    s("text", { x: x(now - ago), y: f.h - 5, class: "x" }, svg).textContent = label;
  }
  for (const [from, to] of bands) {
    const a = Math.max(f.x0, x(from));
    const b = Math.min(f.x1, x(to));
    if (b > a) s("rect", { x: a, y: f.y1, width: b - a, height: f.y0 - f.y1, class: "band" }, svg);
  }
  let drawn = 0;
  for (const line of lines) {
    let d = "";
    let pen = false;
    let last = null;
    for (const [t, v] of line.points) {
      if (v == null || now - t > span) {
        pen = false;
        continue;
      }
      d += (pen ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
      last = [t, v];
    }
    if (!d) continue;
    drawn++;
    const path = s("path", { d, stroke: line.color, class: "line" + (line.dashed ? " dashed" : "") }, svg);
    s("title", {}, path).textContent = line.label;
    if (!line.dashed) s("circle", { cx: x(last[0]), cy: y(last[1]), r: 2.6, fill: line.color }, svg);
  }
  if (!drawn) empty(svg, f, emptyText);
}

/** Stacked bars, one per day. stacks: {day: [[name, value], …]}; colors: name → colour. */
function barChart(svg, days, stacks, { format, colorFor }) {
  const f = frame(svg);
  const totals = days.map((day) => (stacks[day] || []).reduce((sum, [, v]) => sum + v, 0));
  const max = Math.max(0, ...totals);
  const top = axisTop(max);
  yAxis(svg, f, top, format);
  const slot = (f.x1 - f.x0) / days.length;
  const width = Math.max(2, slot * 0.72);
  const labelEvery = Math.ceil(days.length / Math.max(1, Math.floor((f.x1 - f.x0) / 60)));
  days.forEach((day, i) => {
    const cx = f.x0 + slot * (i + 0.5);
    if ((days.length - 1 - i) % labelEvery === 0) {
      s("text", { x: cx, y: f.h - 5, class: "x" }, svg).textContent = shortDay(day);
    }
    let base = f.y0;
    for (const [name, v] of stacks[day] || []) {
      if (!(v > 0)) continue;
      const hgt = ((f.y0 - f.y1) * v) / top;
      const rect = s(
        "rect",
        { x: cx - width / 2, y: base - hgt, width, height: Math.max(hgt, 0.5), fill: colorFor(name), class: "bar" },
        svg,
      );
      s("title", {}, rect).textContent = `${day} · ${name}: ${format(v, true)}`;
      base -= hgt;
    }
  });
  if (!max) empty(svg, f, "no usage in these days");
}

function shortDay(day) {
  const d = new Date(day + "T00:00:00Z");
  return d.toLocaleDateString("en-US", { month: "short", day: "numeric", timeZone: "UTC" });
}

// ---- talking to the gateway ----------------------------------------------------------------------------------
const state = {
  key: null,
  run: 0, // bumped on sign-out: the pollers of an older run stop
  timers: new Set(),
  lastOk: 0,
  endpoints: new Map(), // endpoint → [{t, ttfb50, ttfb99, lat50, lat99, err, tps, flight, ejected}]
  latest: null, // the last /api/v1/providers answer
  requestRates: new Map(), // status class → [[t, requests/s]]
  prevCounts: null, // {t, counts} from the previous /metrics scrape
  metricsAt: 0, // when /metrics last answered
  activity: null, // the last /api/v1/activity answer (redrawn on resize)
};

/** GET a path. Resolves to {status, data}: data is undefined unless the answer was 2xx and parsed. */
async function api(path, { text = false, withKey = true } = {}) {
  let r;
  try {
    const headers = withKey ? { Authorization: "Bearer " + state.key } : {};
    r = await fetch(path, { headers, cache: "no-store" });
  } catch {
    return { status: 0 }; // unreachable: restarting, network
  }
  if (!r.ok) return { status: r.status };
  try {
    return { status: r.status, data: text ? await r.text() : await r.json() };
  } catch {
    return { status: -1 }; // not the JSON (or text) we asked for
  }
}

function why(status) {
  if (status === 0) return "gateway unreachable";
  if (status === 403) return "needs an admin key";
  if (status === 404) return "not available on this gateway";
  if (status === -1) return "unexpected answer";
  return "error " + status;
}

/** Poll `path` every `every` ms into `onData`. A failure is noted in `cards` (404 or 403: the panel is "absent"
and asked again rarely) and passed to `onFail`; 401 means the key is wrong: back to the form. */
function poll(path, every, { onData, cards = [], onFail = null, text = false, withKey = true }) {
  const run = state.run;
  const tick = async () => {
    if (run !== state.run) return;
    const res = await api(path, { text, withKey });
    if (run !== state.run) return;
    let wait = every;
    if (res.data !== undefined) {
      for (const card of cards) setNote(card, "");
      try {
        onData(res.data);
      } catch (err) {
        for (const card of cards) setNote(card, "could not show this answer");
        console.error("dashboard: drawing " + path, err);
      }
    } else if (res.status === 401) {
      signOut("The gateway refused this key.");
      return;
    } else {
      const absent = res.status === 404 || res.status === 403;
      for (const card of cards) setNote(card, why(res.status), absent);
      if (onFail) onFail(res.status);
      if (absent) wait = Math.max(every, ABSENT_MS);
    }
    const timer = setTimeout(() => {
      state.timers.delete(timer);
      tick();
    }, wait);
    state.timers.add(timer);
  };
  tick();
}

function liveStatus(status) {
  const live = document.getElementById("live");
  const ok = status >= 200 && status < 300;
  if (ok) state.lastOk = Date.now() / 1000;
  live.className = "live " + (ok ? "ok" : "down");
  document.getElementById("live-text").textContent = ok
    ? "live · " + fmt.clock(state.lastOk)
    : why(status) + (state.lastOk ? " · last data " + fmt.clock(state.lastOk) : "");
}

// ---- providers: the live view --------------------------------------------------------------------------------
// The monitor gives no quantile from fewer samples than its minimum (health/window.py: 20 by default).
const QUANTILES_EMPTY = "too few requests in the last 5 min for quantiles";

function errorShare(ep) {
  const o = ep.outcomes_5m || {};
  const failed = FAILURES.reduce((sum, k) => sum + (o[k] || 0), 0);
  const total = failed + (o.ok || 0);
  return total ? failed / total : null;
}

function onProviders(body) {
  const now = Date.now() / 1000;
  const list = [...(body.data || [])].sort((a, b) => a.endpoint.localeCompare(b.endpoint));
  for (const ep of list) {
    colorOf(colors.endpoints, ep.endpoint);
    if (!state.endpoints.has(ep.endpoint)) state.endpoints.set(ep.endpoint, []);
    const samples = state.endpoints.get(ep.endpoint);
    samples.push({
      t: now,
      ttfb50: ep.ttfb_s?.p50 ?? null,
      ttfb99: ep.ttfb_s?.p99 ?? null,
      lat50: ep.latency_s?.p50 ?? null,
      lat99: ep.latency_s?.p99 ?? null,
      err: errorShare(ep),
      tps: ep.throughput_tps ?? null,
      flight: ep.in_flight ?? 0,
      ejected: !!ep.ejected,
    });
    while (samples.length && now - samples[0].t > KEEP_S) samples.shift();
  }
  state.latest = { t: now, list };
  liveStatus(200);
  drawProviders();
}

function series(field, { dashed = false, suffix = "" } = {}) {
  return [...state.endpoints].map(([name, samples]) => ({
    label: name + suffix,
    color: colorOf(colors.endpoints, name),
    dashed,
    points: samples.map((p) => [p.t, p[field]]),
  }));
}

/** The time spans during which an endpoint was ejected: from the sample before each ejected one. */
function ejectedBands() {
  const bands = [];
  for (const samples of state.endpoints.values()) {
    samples.forEach((p, i) => {
      if (p.ejected) bands.push([i ? samples[i - 1].t : p.t - FAST_MS / 1000, p.t]);
    });
  }
  return bands;
}

function drawProviders() {
  if (!state.latest) return;
  const { t: now, list } = state.latest;
  const since = Math.min(now, ...[...state.endpoints.values()].map((samples) => samples[0]?.t ?? now));
  $("#live-span").textContent = `this tab's history since ${fmt.clock(since)} (up to ${KEEP_S / 60} min) · every 2 s`;
  $("#ep-legend").replaceChildren(
    ...list.map((ep) => h("span", {}, swatch(colorOf(colors.endpoints, ep.endpoint)), ep.endpoint)),
  );
  lineChart(
    $("#c-ttft svg"),
    [...series("ttfb50", { suffix: " p50" }), ...series("ttfb99", { dashed: true, suffix: " p99" })],
    { format: fmt.ms, now, minStep: 0.0025, emptyText: QUANTILES_EMPTY },
  );
  lineChart(
    $("#c-latency svg"),
    [...series("lat50", { suffix: " p50" }), ...series("lat99", { dashed: true, suffix: " p99" })],
    { format: fmt.ms, now, minStep: 0.0025, emptyText: QUANTILES_EMPTY },
  );
  lineChart($("#c-errors svg"), series("err"), {
    format: fmt.pctAxis,
    now,
    bands: ejectedBands(),
    minStep: 0.025, // 10% at least
  });
  lineChart($("#c-throughput svg"), series("tps"), { format: fmt.compact, now, minStep: 1 });
  lineChart($("#c-flight svg"), series("flight"), { format: fmt.compact, now, minStep: 1 });

  const ejected = list.filter((ep) => ep.ejected).length;
  tile(
    "tile-endpoints",
    `${list.length - ejected} / ${list.length}`,
    ejected ? `${ejected} ejected` : "all healthy",
    ejected > 0,
  );
  tile("tile-flight", fmt.int(list.reduce((sum, ep) => sum + (ep.in_flight || 0), 0)), null);

  fillTable(document.getElementById("endpoints"), list.map(endpointRow), 10);
}

/** One row of the endpoints table: state, quantiles, throughput, uptime and outcome counts. */
function endpointRow(ep) {
  const health = ep.ejected
    ? h(
        "span",
        { class: "badge bad" },
        "ejected" + (ep.ejected_for_s != null ? " · " + fmt.duration(ep.ejected_for_s) : ""),
      )
    : h("span", { class: "badge ok" }, "healthy");
  const u = ep.uptime || {};
  const o = ep.outcomes_5m || {};
  const outcomes = Object.entries(o)
    .filter(([, n]) => n > 0)
    .map(([k, n]) =>
      h(
        "span",
        { class: "badge" + (k === "ok" ? " ok" : FAILURES.includes(k) ? " bad" : "") },
        `${k.replaceAll("_", " ")} ${fmt.int(n)}`,
      ),
    );
  return h(
    "tr",
    { "data-endpoint": ep.endpoint },
    h(
      "td",
      { class: "name" },
      swatch(colorOf(colors.endpoints, ep.endpoint)),
      h("span", {}, ep.endpoint, h("br"), h("span", { class: "small" }, (ep.models || []).join(", "))),
    ),
    h("td", {}, health, ep.ejections ? h("span", { class: "small" }, ` ${fmt.int(ep.ejections)}× ejected`) : null),
    td(fmt.int(ep.in_flight), { key: "in_flight", value: ep.in_flight }),
    td(fmt.ms(ep.ttfb_s?.p50), { key: "ttfb_p50", value: ep.ttfb_s?.p50 }),
    td(fmt.ms(ep.ttfb_s?.p99), { key: "ttfb_p99", value: ep.ttfb_s?.p99 }),
    td(fmt.ms(ep.latency_s?.p50), { key: "latency_p50", value: ep.latency_s?.p50 }),
    td(fmt.ms(ep.latency_s?.p99), { key: "latency_p99", value: ep.latency_s?.p99 }),
    td(fmt.tps(ep.throughput_tps), { key: "throughput", value: ep.throughput_tps }),
    td([u["5m"], u["30m"], u["1d"]].map((v) => fmt.pct(v)).join(" · "), { key: "uptime" }),
    h(
      "td",
      {},
      outcomes.length ? h("span", { class: "outcomes" }, ...outcomes) : h("span", { class: "small" }, "no attempts"),
    ),
  );
}

// ---- /metrics: request rates and hedges ----------------------------------------------------------------------
/** Prometheus text format → [{name, labels, value}] (comments and blank lines skipped). */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

function onMetrics(text) {
  const now = Date.now() / 1000;
  const samples = parseMetrics(text);
  const counts = {};
  const hedges = { won: 0, lost: 0 };
  for (const { name, labels, value } of samples) {
    if (name === "hedgerow_requests_total") counts[labels.status_class] = (counts[labels.status_class] || 0) + value;
    if (name === "hedgerow_hedges_total" && labels.result in hedges) hedges[labels.result] += value;
  }
  const prev = state.prevCounts;
  if (prev) {
    for (const cls of new Set([...Object.keys(counts), ...Object.keys(prev.counts)])) {
      const delta = (counts[cls] || 0) - (prev.counts[cls] || 0);
      if (!state.requestRates.has(cls)) state.requestRates.set(cls, []);
      const points = state.requestRates.get(cls);
      points.push([now, delta >= 0 ? delta / (now - prev.t) : null]); // a drop: the gateway restarted
      while (points.length && now - points[0][0] > KEEP_S) points.shift();
    }
  }
  state.prevCounts = { t: now, counts };
  state.metricsAt = now;
  const fired = hedges.won + hedges.lost;
  const hedgeTile = document.getElementById("tile-hedges");
  hedgeTile.dataset.won = hedges.won;
  hedgeTile.dataset.fired = fired;
  tile(
    "tile-hedges",
    fired ? `${fmt.int(hedges.won)} / ${fmt.int(fired)}` : "0",
    fired ? `won / fired · ${fmt.pct(hedges.won / fired, 0)}` : "none fired yet",
  );
  drawRequests();
}

function drawRequests() {
  if (!state.metricsAt) return;
  const lines = [...state.requestRates]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([cls, points]) => ({ label: cls, color: STATUS_COLORS[cls] || "#6b7280", points }));
  lineChart($("#c-requests svg"), lines, {
    format: fmt.rate,
    now: state.metricsAt,
    minStep: 0.25,
    emptyText: "measuring…",
  });
}

function metricsFailed(status) {
  tile("tile-hedges", DASH, status === 404 ? "/metrics is off" : "/metrics: " + why(status));
}

function rankingsFailed(status) {
  const sub = status === 404 ? "no rankings here" : why(status);
  for (const id of ["tile-requests", "tile-tokens", "tile-spend"]) tile(id, DASH, sub);
}

// ---- rankings, keys, activity --------------------------------------------------------------------------------
function when(v) {
  if (v == null) return "";
  const d = typeof v === "number" ? new Date(v * 1000) : new Date(v);
  return isNaN(d) ? String(v) : d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

// /api/v1/rankings counts whole UTC days: a period of N days is the N days ending with today.
const PERIOD_NAMES = { day: "today (UTC)", week: "last 7 days (UTC)", month: "last 30 days (UTC)" };

/** Tokens against the period before; `trend` is that change as a fraction (null: nothing before). */
function trendCell(row) {
  const t = row.trend;
  const prev = row.previous?.total_tokens;
  const change = typeof t === "number" ? t : prev ? row.total_tokens / prev - 1 : null;
  if (change == null) return td(row.previous ? "new" : DASH, { key: "trend" });
  const cls = change > 0.005 ? "up" : change < -0.005 ? "down" : "";
  const arrow = cls === "up" ? "▲ " : cls === "down" ? "▼ " : "";
  const el = td(arrow + fmt.pct(Math.abs(change), 0), { key: "trend", value: change });
  el.classList.add(cls || "muted");
  if (row.previous)
    el.title = `previous period: ${fmt.int(row.previous.requests)} requests, ${fmt.int(row.previous.total_tokens)} tokens`;
  return el;
}

function onRankings(body) {
  const rows = body.data || [];
  const sum = (k) => rows.reduce((a, r) => a + (r[k] || 0), 0);
  const period = PERIOD_NAMES[body.period] || body.period || "";
  const span = $("#rankings-span");
  span.textContent = period;
  span.title = body.start != null ? `${when(body.start)} → ${when(body.end)}` : "";
  tile("tile-requests", fmt.int(sum("requests")), period);
  tile(
    "tile-tokens",
    fmt.compact(sum("total_tokens")),
    `${fmt.int(sum("prompt_tokens"))} in · ${fmt.int(sum("completion_tokens"))} out`,
  );
  tile("tile-spend", fmt.usd(sum("cost")), period);
  const total = sum("total_tokens");
  const trs = rows.map((r, i) =>
    h(
      "tr",
      { "data-model": r.model },
      td(String(i + 1)),
      h("td", { class: "name" }, swatch(colorOf(colors.models, r.model)), r.model),
      td(fmt.int(r.requests), { key: "requests", value: r.requests }),
      td(fmt.int(r.prompt_tokens), { key: "prompt_tokens", value: r.prompt_tokens }),
      td(fmt.int(r.completion_tokens), { key: "completion_tokens", value: r.completion_tokens }),
      td(fmt.int(r.total_tokens), { key: "total_tokens", value: r.total_tokens }),
      td(fmt.usd(r.cost), { key: "cost", value: r.cost }),
      h("td", {}, meter(r.share ?? (total ? r.total_tokens / total : 0), colorOf(colors.models, r.model))),
      trendCell(r),
    ),
  );
  fillTable(document.getElementById("rankings"), trs, 9);
}

function onKeys(body) {
  const keys = [...(body.data || [])].sort((a, b) => (b.usage || 0) - (a.usage || 0));
  const rows = keys.map((k) =>
    h(
      "tr",
      { "data-key": k.id, class: k.disabled ? "off" : null },
      h("td", { title: k.id }, k.label || k.id, k.disabled ? h("span", { class: "small" }, " disabled") : null),
      td(fmt.usd(k.usage), { key: "usage", value: k.usage }),
      td(k.limit == null ? "no limit" : fmt.usd(k.limit) + (k.limit_reset ? " / " + k.limit_reset : ""), {
        key: "limit",
        value: k.limit,
      }),
      h("td", {}, k.limit ? meter((k.usage || 0) / k.limit) : h("span", { class: "small" }, "")),
    ),
  );
  fillTable(document.getElementById("keys"), rows, 4);
}

function lastDays(n) {
  const today = Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate());
  return Array.from({ length: n }, (_, i) => new Date(today - (n - 1 - i) * 86400000).toISOString().slice(0, 10));
}

function onActivity(body) {
  state.activity = body;
  drawActivity();
}

function drawActivity() {
  if (!state.activity) return;
  const rows = state.activity.data || [];
  const days = lastDays(DAYS);
  const tokens = {};
  const spend = {};
  const models = [...new Set(rows.map((r) => r.model))].sort();
  for (const m of models) colorOf(colors.models, m);
  for (const r of rows) {
    (tokens[r.day] ||= []).push([r.model, (r.prompt_tokens || 0) + (r.completion_tokens || 0)]);
    (spend[r.day] ||= []).push([r.model, (r.cost || 0) + (r.fee || 0)]);
  }
  const colorFor = (m) => colorOf(colors.models, m);
  $("#model-legend").replaceChildren(...models.map((m) => h("span", {}, swatch(colorFor(m)), m)));
  barChart($("#c-tokens svg"), days, tokens, {
    format: (v, exact) => (exact ? fmt.int(v) + " tokens" : fmt.compact(v)),
    colorFor,
  });
  barChart($("#c-spend svg"), days, spend, { format: (v, exact) => (exact ? fmt.usd(v) : fmt.usdAxis(v)), colorFor });
}

// ---- start, sign in, sign out --------------------------------------------------------------------------------
function start() {
  document.getElementById("login").hidden = true;
  document.getElementById("board").hidden = false;
  document.getElementById("signout").hidden = false;
  const card = (id) => document.getElementById(id);
  const live = [card("live-card"), card("endpoints")];
  poll("/api/v1/providers", FAST_MS, { onData: onProviders, cards: live, onFail: liveStatus });
  // /metrics asks for no key (scrapers send none), so none is sent
  poll("/metrics", FAST_MS, {
    onData: onMetrics,
    cards: [card("c-requests")],
    onFail: metricsFailed,
    text: true,
    withKey: false,
  });
  poll("/api/v1/rankings?period=day", SLOW_MS, {
    onData: onRankings,
    cards: [card("rankings")],
    onFail: rankingsFailed,
  });
  poll("/api/v1/keys", SLOW_MS, { onData: onKeys, cards: [card("keys")] });
  poll(`/api/v1/activity?days=${DAYS}`, SLOW_MS, { onData: onActivity, cards: [card("activity")] });
}

function signOut(message = "") {
  state.run++;
  for (const timer of state.timers) clearTimeout(timer);
  state.timers.clear();
  state.key = null;
  sessionStorage.removeItem(KEY_ITEM);
  document.getElementById("board").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message;
  document.getElementById("live").className = "live";
  document.getElementById("live-text").textContent = "not signed in";
  document.getElementById("key").focus();
}

/** The key from `?key=` (then removed from the address bar and history) or from this tab's sessionStorage. */
function storedKey() {
  const url = new URL(location.href);
  const given = url.searchParams.get("key");
  if (given) {
    sessionStorage.setItem(KEY_ITEM, given);
    url.searchParams.delete("key");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem(KEY_ITEM);
}

function redraw() {
  drawProviders();
  drawRequests();
  drawActivity();
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  document.getElementById("key").value = "";
  state.key = key;
  start();
});
document.getElementById("signout").addEventListener("click", () => signOut());
let resizeTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(redraw, 150);
});

state.key = storedKey();
if (state.key) start();
else signOut();
