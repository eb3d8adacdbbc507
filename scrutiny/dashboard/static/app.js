// Scrutiny dashboard: a small page over the JSON API under ./api/.
//
// Rule: record content is never parsed as HTML. Every element is built with
// createElement / createElementNS and every piece of data goes in with textContent,
// createTextNode or an attribute value — there is no innerHTML anywhere in this file.

const KINDS = new Set(["chain", "llm", "chat_model", "retriever", "tool", "embedding",
  "parser", "prompt", "query", "synthesize"]);
const STATUSES = new Set(["pending", "running", "done", "failed", "skipped", "ok", "error",
  "cancelled"]);
const PALETTE = ["#3656d6", "#e08a3c", "#2f9e8f", "#b75fc4", "#c0392b", "#5b8def",
  "#7a8b2f", "#d4589a", "#4aa3df", "#8a6d3b", "#2e3546", "#9aa3b5"];
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  info: { poll_ms: 1000 },
  apps: [],
  board: null,        // last /api/leaderboard answer
  directions: {},     // feedback name -> higher_is_better
  gen: 0,             // bumped on every navigation: stale polls stop themselves
  timer: null,
  chartsAt: 0,
  chartsKey: "",
  chartsStale: false,
  chartsTimer: null,
};

// ------------------------------------------------------------------ DOM helpers
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  append(el, children);
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function setProps(el, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

function $(id) { return document.getElementById(id); }

// A value the API keyed by a name that comes from the data (a feedback named "constructor"
// or "__proto__"): only the object's own entry, never one of Object.prototype's members.
function own(obj, key) {
  return obj && Object.prototype.hasOwnProperty.call(obj, key) ? obj[key] : undefined;
}

// ------------------------------------------------------------------ formatting
function fmtScore(x) { return x === null || x === undefined ? "—" : Number(x).toFixed(3); }
function fmtInt(n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"); }
function fmtSeconds(s) {
  if (s === null || s === undefined) return "—";
  // (rounded first: 0.9996 s read "1000 ms")
  return Math.round(s * 1000) < 1000 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "open";
  return Math.round(ms) < 1000 ? `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`
    : `${(ms / 1000).toFixed(2)} s`;
}
// A histogram bin's edge: 2 decimals, or 3 significant digits where toFixed would write
// every digit of an exponent form (4.0000000000000004e+307).
function fmtEdge(x) { return Math.abs(x) < 1e21 ? x.toFixed(2) : String(Number(x.toPrecision(3))); }
function pad(n) { return String(n).padStart(2, "0"); }
// Times are shown in the browser's time zone, and always say which: the zone's name in
// column headers and chart captions, the offset (e.g. "UTC−05:00") after a single time.
function fmtTime(iso, withZone) {
  if (!iso) return "—";
  const d = new Date(iso);
  const text = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withZone ? `${text} ${utcOffset(d)}` : text;
}
function utcOffset(d) {
  const minutes = -d.getTimezoneOffset();
  const a = Math.abs(minutes);
  return `UTC${minutes < 0 ? "−" : "+"}${pad(Math.floor(a / 60))}:${pad(a % 60)}`;
}
function zoneName() {
  let name = null;
  try { name = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (err) { name = null; }
  return name || `local time, ${utcOffset(new Date())}`;
}
function fmtValue(v) {
  if (v === null || v === undefined) return "";
  return typeof v === "string" ? v : JSON.stringify(v, null, 2);
}
function badge(status) {
  return h("span", { class: `badge ${STATUSES.has(status) ? status : ""}`, text: status });
}
function scoreClass(name, score) {
  if (score === null || score === undefined || score < 0 || score > 1) return "score";
  const direction = own(state.directions, name);
  if (direction === undefined) return "score";  // (not known: neither good nor bad)
  const hib = direction !== false;
  const good = hib ? score >= 0.7 : score <= 0.3;
  const bad = hib ? score < 0.4 : score > 0.6;
  return `score${good ? " good" : bad ? " bad" : ""}`;
}
function color(i) { return PALETTE[i % PALETTE.length]; }

// ------------------------------------------------------------------ API
class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, params) {
  const qs = params ? params.toString() : "";
  const resp = await fetch(`api/${path}${qs ? "?" + qs : ""}`,
    { credentials: "same-origin", headers: { Accept: "application/json" } });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error : `${resp.status} ${resp.statusText}`;
    throw new ApiError(resp.status === 401 ? `${msg}: open the URL with ?token=...` : msg, resp.status);
  }
  return body;
}

function showError(err) {
  const el = $("error");
  if (!err) { el.hidden = true; clear(el); return; }
  el.textContent = err instanceof ApiError ? err.message : `Could not reach the dashboard: ${err}`;
  el.hidden = false;
}

function setLive(polling) {
  const el = $("live");
  el.className = `live ${polling ? "polling" : "idle"}`;
  el.textContent = polling ? "live" : "idle";
}

// Fast while something is pending and changing, slower while nothing changes, and never
// so often that the page keeps the server busy more than a third of the time.
class Poller {
  constructor(maxMs) { this.maxMs = maxMs; this.ms = null; this.sig = null; }

  next(sig, busy, costMs) {
    const min = state.info.poll_ms;
    if (!busy) this.ms = Math.max(min, 10000);
    else if (this.ms === null || sig !== this.sig) this.ms = min;
    else this.ms = Math.min(this.maxMs, this.ms * 1.5);
    this.sig = sig;
    return Math.max(this.ms, 3 * costMs);
  }
}

function schedule(fn, ms) {
  clearTimeout(state.timer);
  const gen = state.gen;
  state.timer = setTimeout(() => {
    if (gen !== state.gen) return;
    if (document.hidden) { schedule(fn, ms); return; }
    fn(gen);
  }, ms);
}

// ------------------------------------------------------------------ routing
function route() {
  state.gen += 1;
  clearTimeout(state.timer);
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/record\/(.+)$/);
  state.poller = new Poller(m ? 5000 : 10000);
  if (m) {
    $("home-view").hidden = true;
    $("record-view").hidden = false;
    let id = null;
    try { id = decodeURIComponent(m[1]); } catch (err) { id = null; }  // e.g. "%E0%A4%A"
    if (id === null) {
      showError(null);
      setLive(false);
      renderMissing($("record-view"), `The address "${m[1]}" is not a valid record id.`);
    } else {
      showRecord(id, state.gen);
    }
  } else {
    $("record-view").hidden = true;
    $("home-view").hidden = false;
    showHome(state.gen, true);
  }
}

function filters() {
  const hash = location.hash || "#/";
  const i = hash.indexOf("?");
  return new URLSearchParams(i >= 0 ? hash.slice(i + 1) : "");
}

function filtersHash(params) {
  for (const [k, v] of [...params.entries()]) if (!v) params.delete(k);
  const qs = params.toString();
  return `#/${qs ? "?" + qs : ""}`;
}

function setFilters(params) { location.hash = filtersHash(params); }

// ------------------------------------------------------------------ home
// The App and Version dropdowns from state.apps, keeping what the address has chosen.
function fillAppSelects() {
  const form = $("filters");
  const f = filters();
  const names = [...new Set(state.apps.map((a) => a.app_name))];
  fillSelect(form.elements.app, names, "all", f.get("app"));
  const versions = [...new Set(state.apps
    .filter((a) => !f.get("app") || a.app_name === f.get("app"))
    .map((a) => a.app_version))];
  fillSelect(form.elements.version, versions, "all", f.get("version"));
}

// The chosen app and/or version as app ids: a name such as "team:qa" can also be the id
// of app "team" version "qa", and the server reads a value as an id first. A version
// alone is every app's version of that name (the leaderboard showed every version).
function appParamsFor(f) {
  const chosen = f.get("app") || f.get("version") ? state.apps.filter((a) =>
    (!f.get("app") || a.app_name === f.get("app"))
    && (!f.get("version") || a.app_version === f.get("version"))) : [];
  const appParams = new URLSearchParams();
  for (const a of chosen) appParams.append("app", a.app_id);
  if (f.get("app") && !chosen.length) {  // (not among the apps loaded: as it was given)
    appParams.set("app", f.get("app"));
    if (f.get("version")) appParams.set("version", f.get("version"));
  }
  return appParams;
}

function fillSelect(sel, values, anyLabel, current) {
  const key = JSON.stringify([values, current || ""]);
  if (sel.dataset.key === key) return;  // unchanged: leave an open dropdown alone
  sel.dataset.key = key;
  clear(sel);
  if (anyLabel !== null) sel.appendChild(h("option", { value: "", text: anyLabel }));
  for (const v of values) sel.appendChild(h("option", { value: v, text: v }));
  if (current && !values.includes(current)) sel.appendChild(h("option", { value: current, text: current }));
  sel.value = current || "";
}

function syncForm() {
  const form = $("filters");
  const f = filters();
  for (const name of ["record_status", "status", "min_score", "max_score", "q"]) {
    form.elements[name].value = f.get(name) || "";
  }
}

async function showHome(gen, first) {
  try {
    let appsFresh = false;
    if (first) {
      state.homeHash = location.hash || "#/";
      syncForm();
      if (!state.apps.length) { state.apps = await api("apps"); appsFresh = true; }
      if (gen !== state.gen) return;
      fillAppSelects();
    }
    const f = filters();
    const appParams = appParamsFor(f);
    const recParams = new URLSearchParams(appParams);
    if (!f.get("app") && f.get("version")) recParams.set("version", f.get("version"));
    for (const k of ["record_status", "feedback", "status", "min_score", "max_score", "q",
      "offset"]) {
      if (f.get(k)) recParams.set(k, f.get(k));
    }
    recParams.set("limit", "50");
    const began = performance.now();
    // (the apps again on every refresh: a version stored since is in the dropdowns, and in
    // the chosen app's ids, which were only those of the page's first look)
    const [apps, board, page] = await Promise.all([appsFresh ? state.apps : api("apps"),
      api("leaderboard", appParams), api("records", recParams)]);
    if (gen !== state.gen) return;
    state.apps = apps;
    fillAppSelects();
    if (String(appParamsFor(f)) !== String(appParams)) {  // the choice has new versions
      await showHome(gen, first);
      return;
    }
    const cost = performance.now() - began;
    showError(null);
    const sig = JSON.stringify([board.rows.map((r) => [r.app_id, r.records, r.pending, r.running,
      r.failed, r.skipped, Object.values(r.scores).map((c) => c.done)]), page.total,
    page.records.map((r) => [r.record_id, r.feedback])]);
    const changed = first || sig !== state.poller.sig;
    state.board = board;
    state.directions = Object.fromEntries(board.feedbacks.map((fb) => [fb.name, fb.higher_is_better]));
    const fbSel = $("filters").elements.feedback;
    fillSelect(fbSel, board.feedbacks.map((fb) => fb.name), "any", f.get("feedback"));
    if (changed) {
      renderLeaderboard(board);
      renderRecords(page, board);
    }
    const key = `${appParams}|${f.get("version") || ""}`;
    const busy = board.rows.some((r) => r.pending + r.running > 0) ||
      page.records.some((r) => Object.values(r.feedback).some((x) => x.status === "pending" || x.status === "running"));
    if (changed) state.chartsStale = true;
    const since = Date.now() - state.chartsAt;
    if (first || key !== state.chartsKey || (state.chartsStale && since > 5000) ||
        since > 60000) {
      state.chartsStale = false;
      loadCharts(gen, appParams, f.get("version"), key);
    } else if (state.chartsStale && !state.chartsTimer) {
      // (a change seen within 5 s of the last chart load: loaded once those 5 s are up —
      // it waited for the 60 s timer, the chart saying "No scores yet" under new scores)
      state.chartsTimer = setTimeout(() => {
        state.chartsTimer = null;
        if (gen !== state.gen || !state.chartsStale) return;
        state.chartsStale = false;
        loadCharts(gen, appParams, f.get("version"), key);
      }, 5000 - since);
    }
    setLive(busy);
    schedule((g) => showHome(g, false), state.poller.next(sig, busy, cost));
  } catch (err) {
    if (gen !== state.gen) return;
    showError(err);
    setLive(false);
    if (err instanceof ApiError && err.status === 400) {
      // A filter the server refused: the records of the previous filters must not stay on
      // screen under these ones, as if they matched.
      renderRefused(err.message);
      return;
    }
    schedule((g) => showHome(g, first), 5000);
  }
}

function renderRefused(message) {
  $("records-count").textContent = "";
  clear($("pager"));
  clear($("records")).appendChild(h("div", { class: "empty", id: "records-refused" },
    `No records shown: ${message}. Change the filters above or `,
    h("a", { href: "#/", text: "clear them" }), "."));
  state.poller.sig = null;  // (the next good answer is drawn in full)
}

function renderLeaderboard(board) {
  const wrap = clear($("leaderboard"));
  if (!board.rows.length) {
    wrap.appendChild(h("div", { class: "empty", text: "No records yet." }));
    return;
  }
  // The best mean of each feedback, as shown (3 decimals): means that look equal are equally
  // best, whatever float noise sits past the last shown digit (0.05 vs 0.049999999999999996).
  const shown = (m) => Number(fmtScore(m));
  const best = new Map();
  for (const fb of board.feedbacks) {
    const means = board.rows.map((r) => (own(r.scores, fb.name) || {}).mean).filter((m) => m !== null && m !== undefined).map(shown);
    if (means.length > 1) best.set(fb.name, fb.higher_is_better ? Math.max(...means) : Math.min(...means));
  }
  const head = h("tr", null,
    h("th", { text: "App" }), h("th", { text: "Version" }), h("th", { class: "num", text: "Records" }),
    board.feedbacks.map((fb) => h("th", { class: "num", title: fb.higher_is_better ? "higher is better" : "lower is better" },
      fb.name, " ", h("span", { class: "arrow", text: fb.higher_is_better ? "↑" : "↓" }))),
    h("th", { class: "num", text: "Latency" }), h("th", { class: "num", text: "Tokens" }),
    h("th", { class: "num", text: "Pending" }), h("th", { class: "num", text: "Running" }),
    h("th", { class: "num", text: "Failed" }), h("th", { class: "num", text: "Skipped" }));
  const rows = board.rows.map((row) => h("tr", {
    class: "clickable", dataset: { app: row.app_id },
    title: "Show the records of this version",
    onclick: () => {
      const f = filters();
      f.set("app", row.app_name); f.set("version", row.app_version); f.delete("offset");
      setFilters(f);
    },
  },
  h("td", { text: row.app_name }), h("td", { class: "mono", text: row.app_version }),
  h("td", { class: "num", text: fmtInt(row.records) }),
  board.feedbacks.map((fb) => {
    const c = own(row.scores, fb.name);
    if (!c) return h("td", { class: "num muted", text: "—" });
    const isBest = best.has(fb.name) && c.mean !== null && shown(c.mean) === best.get(fb.name);
    return h("td", { class: `num cell${isBest ? " best" : ""}`, dataset: { feedback: fb.name } },
      h("div", { class: "mean", text: fmtScore(c.mean) }),
      h("div", { class: "counts", text: `n=${fmtInt(c.done)}` }),
      c.pending ? h("span", { class: "badge pending", text: `${fmtInt(c.pending)} pending` }) : null,
      c.running ? h("span", { class: "badge running", text: `${fmtInt(c.running)} running` }) : null,
      c.failed ? h("span", { class: "badge failed", text: `${fmtInt(c.failed)} failed` }) : null,
      c.skipped ? h("span", { class: "badge skipped", text: `${fmtInt(c.skipped)} skipped` }) : null);
  }),
  h("td", { class: "num", text: fmtSeconds(row.latency) }),
  h("td", { class: "num", text: row.total_tokens === null ? "—" : fmtInt(Math.round(row.total_tokens)) }),
  h("td", { class: "num", dataset: { count: "pending" }, text: fmtInt(row.pending) }),
  h("td", { class: "num", dataset: { count: "running" }, text: fmtInt(row.running) }),
  h("td", { class: "num", dataset: { count: "failed" }, text: fmtInt(row.failed) }),
  h("td", { class: "num", dataset: { count: "skipped" }, text: fmtInt(row.skipped) })));
  wrap.appendChild(h("table", { class: "leaderboard" }, h("thead", null, head), h("tbody", null, rows)));
}

function renderRecords(page, board) {
  const wrap = clear($("records"));
  $("records-count").textContent = `${fmtInt(page.total)} matching`;
  const names = [...new Set([...board.feedbacks.map((fb) => fb.name),
    ...page.records.flatMap((r) => Object.keys(r.feedback))])].sort();
  const pastEnd = !page.records.length && page.total > 0;
  if (pastEnd) {
    const first = filters();
    first.delete("offset");
    wrap.appendChild(h("div", { class: "empty", id: "past-end" },
      `Nothing on this page: it starts after the last of the ${fmtInt(page.total)} matching records. `,
      h("a", { href: filtersHash(first), text: "← First page" })));
  } else if (!page.records.length) {
    wrap.appendChild(h("div", { class: "empty", text: "No records match." }));
  } else {
    const head = h("tr", null, h("th", { title: "Start time, in this browser's time zone" }, "Time",
      h("div", { class: "hint zone", text: zoneName() })), h("th", { text: "App" }),
      h("th", { text: "Status" }), h("th", { text: "Input" }), h("th", { text: "Output" }),
      h("th", { class: "num", text: "Latency" }), names.map((n) => h("th", { class: "num", text: n })));
    const rows = page.records.map((r) => h("tr", {
      class: "clickable", dataset: { recordId: r.record_id },
      onclick: (ev) => { if (!(ev.target instanceof HTMLAnchorElement)) location.hash = recordHash(r.record_id); },
    },
    h("td", { class: "mono", text: fmtTime(r.start_time), title: r.start_time ? `${fmtTime(r.start_time, true)} = ${r.start_time}` : null }),
    h("td", null, r.app_name, " ", h("span", { class: "mono muted", text: r.app_version })),
    h("td", r.error ? { title: r.error } : null, badge(r.status)),
    h("td", { class: "preview", title: r.input_preview },
      h("a", { href: recordHash(r.record_id), text: r.input_preview || "(empty)" })),
    // (a failed call has no output: its error is what the row shows there, as it said
    // nothing of why)
    r.output_preview || !r.error
      ? h("td", { class: "preview output", title: r.output_preview, text: r.output_preview })
      : h("td", { class: "preview output call-error", title: r.error, text: r.error }),
    h("td", { class: "num", text: fmtSeconds(r.latency) }),
    names.map((n) => {
      const x = own(r.feedback, n);
      if (!x) return h("td", { class: "num muted", title: `not evaluated with ${n}`, text: "—" });
      return h("td", { class: "num", dataset: { feedback: n, status: x.status },
        title: x.reason ? `${n}: ${x.reason}` : null },
        x.status === "done" ? h("span", { class: scoreClass(n, x.score), text: fmtScore(x.score) }) : badge(x.status));
    })));
    wrap.appendChild(h("table", { class: "records" }, h("thead", null, head), h("tbody", null, rows)));
  }
  const pager = clear($("pager"));
  const from = page.offset + 1;
  const to = page.offset + page.records.length;
  // Past the end, "Newer" goes to the last page that has records.
  const last = Math.floor(Math.max(0, page.total - 1) / page.limit) * page.limit;
  const newer = pastEnd ? Math.min(page.offset - page.limit, last) : page.offset - page.limit;
  const go = (offset) => { const f = filters(); f.set("offset", String(Math.max(0, offset))); setFilters(f); };
  const range = page.records.length ? `${fmtInt(from)}–${fmtInt(to)} of ${fmtInt(page.total)}`
    : pastEnd ? `past the last of ${fmtInt(page.total)}` : "0 of 0";
  pager.append(
    h("button", { type: "button", disabled: page.offset <= 0, onclick: () => go(newer), text: "← Newer" }),
    h("span", { class: "muted", text: range }),
    h("button", { type: "button", disabled: to >= page.total, onclick: () => go(page.offset + page.limit), text: "Older →" }));
}

function recordHash(id) { return `#/record/${encodeURIComponent(id)}`; }

// ------------------------------------------------------------------ charts
async function loadCharts(gen, appParams, version, key) {
  state.chartsAt = Date.now();
  state.chartsKey = key;
  const params = new URLSearchParams(appParams);
  if (version && !params.get("app")) params.set("version", version);  // (every app's)
  try {
    const data = await api("charts", params);
    if (gen !== state.gen) return;
    state.charts = data;
    renderCharts();
  } catch (err) {
    if (gen === state.gen) showError(err);
  }
}

function renderCharts() {
  const data = state.charts;
  if (!data) return;
  const sel = $("chart-feedback");
  const names = Object.keys(data.distributions);
  const current = names.includes(sel.value) ? sel.value : names[0];
  fillSelect(sel, names, null, current);
  $("chart-sample").textContent = `newest ${fmtInt(data.sample)} records per version` +
    (data.truncated ? `, first ${data.versions.length} versions` : "");
  const colors = Object.fromEntries(data.versions.map((v, i) => [v.app_id, color(i)]));
  renderDistribution(data, current, colors);
  renderLatency(data, colors);
}

function renderDistribution(data, name, colors) {
  const wrap = clear($("chart-scores"));
  const dist = own(data.distributions, name);
  if (!dist) { wrap.appendChild(h("div", { class: "empty", text: "No scores yet." })); return; }
  const W = 320, H = 46, bins = data.bins;
  // Halved before subtracting where hi - lo is past the largest number (scores from -1e308
  // to 1e308), as the server's histogram does: an Infinity range gave NaN bins and put
  // every mean at the left edge.
  const k = Number.isFinite(dist.hi - dist.lo) ? 1 : 0.5;
  const range = dist.hi * k - dist.lo * k;
  const step = range / bins;
  const edge = (i) => (dist.lo * k + i * step) / k;
  for (const v of dist.versions) {
    const total = v.counts.reduce((a, b) => a + b, 0) || 1;
    const peak = Math.max(...v.counts, 1);
    const bw = W / bins;
    const bars = v.counts.map((c, i) => {
      const bh = (c / peak) * (H - 4);
      const lo = edge(i);
      const hi = edge(i + 1);
      return svg("rect", { x: i * bw + 1, y: H - bh, width: bw - 2, height: bh, fill: colors[v.app_id], rx: 1 },
        svg("title", null, `${fmtEdge(lo)}–${fmtEdge(hi)}: ${c} (${Math.round((100 * c) / total)}%)`));
    });
    const marks = [];
    if (v.mean !== null) {
      const x = ((v.mean * k - dist.lo * k) / (range || 1)) * W;
      marks.push(svg("line", { x1: x, x2: x, y1: 0, y2: H, stroke: "#1d2330", "stroke-width": 1.5, "stroke-dasharray": "3 2" },
        svg("title", null, `mean ${fmtScore(v.mean)}`)));
    }
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H + 12}`, width: "100%", height: H + 12, preserveAspectRatio: "none", role: "img" },
      svg("line", { class: "axis", x1: 0, x2: W, y1: H, y2: H }), bars, marks,
      svg("text", { x: 0, y: H + 11 }, dist.lo.toFixed(1)),
      svg("text", { x: W, y: H + 11, "text-anchor": "end" }, dist.hi.toFixed(1)));
    const info = data.versions.find((x) => x.app_id === v.app_id);
    const title = `${v.app_id}: ${fmtInt(v.n)} done scores, mean ${fmtScore(v.mean)}` +
      (info ? `, among the newest ${fmtInt(info.sampled)} records` : "");
    wrap.appendChild(h("div", { class: "dist-row", dataset: { app: v.app_id }, title },
      h("div", { class: "dist-label" },
        h("span", { class: "swatch", style: { background: colors[v.app_id] } }), v.app_id,
        h("span", { class: "counts", text: `n=${fmtInt(v.n)} · mean ${fmtScore(v.mean)}` })),
      chart));
  }
  const dir = own(state.directions, name);
  if (dir !== undefined) {
    wrap.appendChild(h("div", { class: "hint", text: dir ? "↑ higher is better" : "↓ lower is better" }));
  }
}

function niceCeil(v) {
  if (!(v > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

function renderLatency(data, colors) {
  const wrap = clear($("chart-latency"));
  const series = data.latency.filter((s) => s.points.length);
  if (!series.length) { wrap.appendChild(h("div", { class: "empty", text: "No records yet." })); return; }
  const W = 640, H = 200, L = 46, B = 22, T = 8, R = 10;
  const all = series.flatMap((s) => s.points);
  let t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  if (t1 === t0) { t0 -= 1; t1 += 1; }
  const ymax = niceCeil(Math.max(...all.map((p) => p[1])));
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const grid = [0, 0.5, 1].map((f) => [
    svg("line", { class: "grid", x1: L, x2: W - R, y1: y(ymax * f), y2: y(ymax * f) }),
    svg("text", { x: L - 4, y: y(ymax * f) + 3, "text-anchor": "end" }, fmtSeconds(ymax * f))]);
  const ticks = [0, 0.5, 1].map((f) => {
    const t = t0 + f * (t1 - t0);
    return svg("text", { x: x(t), y: H - 6, "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle" },
      fmtTime(new Date(t * 1000).toISOString()));
  });
  const dots = series.map((s) => svg("g", { fill: colors[s.app_id], "fill-opacity": 0.6 },
    svg("title", null, s.app_id),
    s.points.map((p) => svg("circle", { cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 2 }))));
  wrap.appendChild(svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img" },
    grid, svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }), ticks, dots));
  wrap.appendChild(h("div", { class: "legend" }, series.map((s) =>
    h("span", null, h("span", { class: "swatch", style: { background: colors[s.app_id] } }), s.app_id)),
  h("span", { class: "hint", id: "latency-zone", text: `times in ${zoneName()}` })));
}

// ------------------------------------------------------------------ record view
async function showRecord(id, gen) {
  const view = $("record-view");
  try {
    const began = performance.now();
    // (by query, not records/<id>: a browser resolves the ids "." and ".." as the path's dot
    // segments, escaped as %2E or not, and asked for api/records/ and api/ instead)
    const rec = await api("record", new URLSearchParams({ id }));
    if (gen !== state.gen) return;
    await learnDirections(rec);
    if (gen !== state.gen) return;
    const cost = performance.now() - began;
    const sig = JSON.stringify(rec.feedback.map((r) => [r.status, r.score]));
    showError(null);
    if (view.dataset.recordId !== id || !view.firstChild) renderRecord(view, rec);
    else renderFeedback(rec);
    setLive(!rec.final);
    if (!rec.final) schedule((g) => showRecord(id, g), state.poller.next(sig, true, cost));
  } catch (err) {
    if (gen !== state.gen) return;
    setLive(false);
    if (err instanceof ApiError && err.status === 404) {
      showError(null);
      renderMissing(view, `There is no record "${id}" in this database.`);
      return;
    }
    showError(err);
    if (!(err instanceof ApiError)) schedule((g) => showRecord(id, g), 5000);
  }
}

// Whether higher or lower scores are better for each of the record's feedbacks, once per
// app version: opened straight from its address (not from the records table), the page did
// not know, and coloured a low score of a lower-is-better feedback as bad.
async function learnDirections(rec) {
  if (!rec.feedback.some((r) => own(state.directions, r.feedback_name) === undefined)) return;
  if (state.directionsAsked === rec.app_id) return;
  state.directionsAsked = rec.app_id;
  try {
    const board = await api("leaderboard", new URLSearchParams({ app: rec.app_id }));
    state.directions = Object.fromEntries([...Object.entries(state.directions),
      ...board.feedbacks.map((fb) => [fb.name, fb.higher_is_better])]);
  } catch (err) {
    // (scores then stay uncoloured)
  }
}

// An unknown or malformed record address: say so, with the way back (never a blank page).
function renderMissing(view, detail) {
  clear(view);
  delete view.dataset.recordId;
  view.append(
    h("p", null, h("a", { href: state.homeHash || "#/", text: "← All records" })),
    h("section", { class: "panel", id: "record-missing" },
      h("h2", { text: "No such record" }),
      h("div", { class: "empty", text: detail })));
}

function renderRecord(view, rec) {
  clear(view);
  view.dataset.recordId = rec.record_id;
  const usage = rec.usage || {};
  view.append(
    h("p", null, h("a", { href: state.homeHash || "#/", text: "← All records" })),
    h("section", { class: "panel" },
      h("div", { class: "record-head" },
        h("h2", null, rec.app_name, " ", h("span", { class: "mono muted", text: rec.app_version })),
        badge(rec.status),
        h("span", { class: "mono muted", text: rec.record_id })),
      h("div", { class: "facts" },
        h("span", { title: rec.start_time || null }, "started ", h("b", { text: fmtTime(rec.start_time, true) })),
        h("span", null, "latency ", h("b", { text: fmtSeconds(rec.latency) })),
        h("span", null, "tokens ", h("b", { text: usage.total_tokens === undefined || usage.total_tokens === null ? "—" : fmtInt(usage.total_tokens) })),
        h("span", null, "spans ", h("b", { text: String(rec.spans.length) })),
        rec.framework ? h("span", null, "framework ", h("b", { text: rec.framework })) : null),
      rec.error ? h("pre", { class: "value reason", text: rec.error }) : null),
    h("section", { class: "panel io" },
      h("div", null, h("h3", { text: "Input" }), h("pre", { class: "value", id: "record-input", text: fmtValue(rec.input) })),
      h("div", null, h("h3", { text: "Output" }), h("pre", { class: "value", id: "record-output", text: fmtValue(rec.output) }))),
    h("section", { class: "panel" }, h("h2", { text: "Feedback" }), h("div", { id: "feedback-cards", class: "cards" })),
    h("section", { class: "panel" }, h("h2", null, "Span tree ", h("span", { class: "hint", text: "click a span for its inputs and outputs" })),
      waterfall(rec)),
    h("section", { class: "panel" },
      h("h3", { text: `Retrieved contexts (${rec.contexts.length})` }),
      rec.contexts.length
        ? h("ol", { class: "contexts" }, rec.contexts.map((c) => h("li", null, h("pre", { class: "value", text: fmtValue(c) }))))
        : h("div", { class: "empty", text: "None." }),
      rec.tags.length ? [h("h3", { text: "Tags" }), rec.tags.map((t) => h("span", { class: "badge", text: fmtValue(t) }))] : null,
      Object.keys(rec.metadata || {}).length ? [h("h3", { text: "Metadata" }), h("pre", { class: "value", text: fmtValue(rec.metadata) })] : null));
  renderFeedback(rec);
}

function renderFeedback(rec) {
  const wrap = $("feedback-cards");
  if (!wrap) return;
  clear(wrap);
  if (!rec.feedback.length) {
    wrap.appendChild(h("div", { class: "empty", text: "No feedback on this record." }));
    return;
  }
  for (const r of rec.feedback) {
    const calls = r.calls && r.calls.length > 1 ? r.calls : [];
    wrap.appendChild(h("div", { class: "card", dataset: { feedback: r.feedback_name, status: r.status } },
      h("div", { class: "head" }, h("span", { class: "name", text: r.feedback_name }), badge(r.status)),
      h("div", { class: `big ${r.status === "done" ? scoreClass(r.feedback_name, r.score) : "muted"}`, text: r.status === "done" ? fmtScore(r.score) : "—" }),
      r.explanation ? h("div", { class: "explanation", text: r.explanation }) : null,
      r.error ? h("div", { class: "reason", text: r.error }) : null,
      calls.length ? h("div", { class: "meta" }, calls.map((c, i) =>
        h("div", null, `call ${i + 1}: `, h("b", { text: fmtScore(c.score) }), c.explanation ? ` — ${c.explanation}` : "", c.error ? ` — ${c.error}` : ""))) : null,
      h("div", { class: "meta", text: [
        r.attempts ? `${r.attempts} attempt${r.attempts > 1 ? "s" : ""}` : null,
        r.latency !== null ? `took ${fmtSeconds(r.latency)}` : null,
        r.ended_at ? `stored ${fmtTime(r.ended_at, true)}` : null,
        // (a result stuck for days looked like one queued a second ago)
        unfinished(r.status) && r.created_at ? `${r.status} for ${fmtAge(r.created_at)}` : null,
      ].filter(Boolean).join(" · ") }),
      r.status === "pending" && ageSeconds(r.created_at) > 60 ? h("div", { class: "meta hint waiting",
        text: "Nothing has started it yet: results left pending are evaluated by a worker " +
          "(`scrutiny worker`) or by session.resume_pending()." }) : null));
  }
}

function unfinished(status) { return status === "pending" || status === "running"; }
function ageSeconds(iso) { return iso ? Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000) : 0; }
function fmtAge(iso) {
  const s = ageSeconds(iso);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} days`;
}

// Indentation: 16 px a level, then 3 px from level DEEP on (with the level written in the
// row): at 16 px a level, a LangGraph agent's spans 20 levels down were indented past the
// name column, their names cut to nothing.
const DEEP = 8;
function indent(depth) {
  return Math.min(depth, DEEP) * 16 + Math.max(0, depth - DEEP) * 3;
}

function waterfall(rec) {
  const total = rec.total_ms || Math.max(1, ...rec.spans.map((s) => (s.offset_ms || 0) + (s.duration_ms || 0)));
  const wrap = h("div", { class: "waterfall" });
  if (!rec.spans.length) { wrap.appendChild(h("div", { class: "empty", text: "No spans." })); return wrap; }
  wrap.appendChild(h("div", { class: "wf-row head" }, h("span", { text: "span" }),
    h("div", { class: "wf-axis" }, ["0", fmtMs(total / 2), fmtMs(total)].map((t) => h("span", { text: t }))),
    h("span", { class: "wf-dur", text: "duration" })));
  for (const s of rec.spans) {
    const left = Math.max(0, Math.min(100, ((s.offset_ms || 0) / total) * 100));
    const dur = s.duration_ms === null ? total - (s.offset_ms || 0) : s.duration_ms;
    const width = Math.max(0, Math.min(100 - left, (dur / total) * 100));
    const kind = KINDS.has(s.kind) ? `kind-${s.kind}` : "";
    const bar = h("div", { class: `wf-bar ${kind}${s.duration_ms === null ? " open" : ""}${s.error ? " error" : ""}`,
      style: { left: `${left}%`, width: `${width}%` }, title: `${s.name}: ${fmtMs(s.duration_ms)} at +${fmtMs(s.offset_ms)}` });
    const detail = h("div", { class: "wf-detail", hidden: true },
      h("div", { class: "facts" },
        h("span", null, "kind ", h("b", { text: s.kind })),
        s.model ? h("span", null, "model ", h("b", { text: s.model })) : null,
        s.usage && s.usage.total_tokens !== null ? h("span", null, "tokens ", h("b", { text: fmtInt(s.usage.total_tokens) })) : null,
        h("span", null, "starts at ", h("b", { text: `+${fmtMs(s.offset_ms)}` }))),
      h("div", null, h("h3", { text: "Inputs" }), h("pre", { class: "value", text: fmtValue(s.inputs) })),
      h("div", null, h("h3", { text: s.error ? "Error" : "Outputs" }), h("pre", { class: `value${s.error ? " reason" : ""}`, text: s.error ? s.error : fmtValue(s.outputs) })));
    const row = h("div", { class: "wf-row", dataset: { spanId: s.span_id, depth: String(s.depth) }, onclick: () => { detail.hidden = !detail.hidden; } },
      h("div", { class: "wf-name", style: { paddingLeft: `${indent(s.depth)}px` }, title: s.name },
        s.depth ? (s.depth > DEEP ? `└${s.depth} ` : "└ ") : "",
        h("span", { class: "span-name", text: s.name }), h("span", { class: "kind", text: s.kind })),
      h("div", { class: "wf-track" }, bar),
      h("span", { class: "wf-dur", text: fmtMs(s.duration_ms) }));
    wrap.append(row, detail);
  }
  return wrap;
}

// ------------------------------------------------------------------ start
function wireFilters() {
  const form = $("filters");
  let typing = null;
  const apply = () => {
    const f = new URLSearchParams();
    for (const el of form.elements) {
      if (el.name && el.value) f.set(el.name, el.value);
    }
    // (a status with feedback "any" is a result of any feedback; a score range needs one
    // feedback, and the server says so. The first feedback was chosen silently instead:
    // "0 matching" for records whose other feedbacks matched.)
    setFilters(f);
  };
  form.addEventListener("submit", (ev) => { ev.preventDefault(); apply(); });
  form.addEventListener("change", (ev) => {
    if (ev.target.name === "app") form.elements.version.value = "";
    apply();
  });
  form.addEventListener("input", (ev) => {
    if (ev.target.name !== "q") return;
    clearTimeout(typing);
    typing = setTimeout(apply, 350);
  });
  form.addEventListener("reset", (ev) => { ev.preventDefault(); setFilters(new URLSearchParams()); });
  $("chart-feedback").addEventListener("change", renderCharts);
  $("refresh").addEventListener("click", route);
}

async function start() {
  wireFilters();
  try {
    state.info = await api("info");
    $("database").textContent = state.info.database;
  } catch (err) {
    showError(err);
  }
  window.addEventListener("hashchange", route);
  route();
}

start();
