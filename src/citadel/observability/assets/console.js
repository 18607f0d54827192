// Citadel's live console: draws the generated dashboards (their Grafana JSON, served by this
// service) with plain SVG. Data comes from this service's query proxy (/v1/query, Prometheus)
// and ledger calls (/v1/ledger, the usage ledger). The key lives in sessionStorage and goes out
// as a bearer token; a 401 brings the sign-in form back.
"use strict";
(() => {
  const KEY = "citadel.console.key";
  const PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
    "#fade2a", "#37872d", "#e0b400", "#1f60c4", "#c4162a"];
  const $ = (id) => document.getElementById(id);
  const state = { boards: [], board: null, timer: null, generation: 0 };

  // -- key and calls ---------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(path) {
    const key = sessionStorage.getItem(KEY);
    if (!key) throw new Unauthorized("no key");
    const r = await fetch(path, { headers: { authorization: "Bearer " + key } });
    if (r.status === 401) throw new Unauthorized("The key was refused.");
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const msg = body && body.error ? body.error.message : "HTTP " + r.status;
      throw new Error(msg);
    }
    return body;
  }

  function showLogin(message) {
    stopTimer();
    $("main").replaceChildren();
    $("tabs").replaceChildren();
    $("controls").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("key").focus();
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("Signed out.");
  });

  function failed(err) {
    if (err instanceof Unauthorized) {
      sessionStorage.removeItem(KEY);
      showLogin(err.message === "no key" ? "" : err.message);
      return true;
    }
    return false;
  }

  // -- formatting ------------------------------------------------------------------------------

  function si(v, digits) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(digits) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(digits) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(digits) + "k";
    if (a === 0) return "0";
    if (a < 0.01) return v.toExponential(1);
    return v.toFixed(a < 10 ? 2 : digits);
  }

  function format(unit, v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    switch (unit) {
      case "percentunit": return (v * 100).toFixed(Math.abs(v) < 0.1 ? 2 : 1) + "%";
      case "s":
        if (Math.abs(v) < 1) return (v * 1000).toFixed(Math.abs(v) < 0.01 ? 2 : 0) + " ms";
        return v.toFixed(2) + " s";
      case "reqps": return si(v, 1) + " req/s";
      case "currencyUSD": return "$" + (Math.abs(v) < 0.01 && v !== 0 ? v.toExponential(2) : si(v, 2));
      default: return si(v, 1);
    }
  }

  function clock(t, span) {
    const d = new Date(t * 1000);
    const hm = d.toTimeString().slice(0, 5);
    return span > 2 * 86400 ? (d.getMonth() + 1) + "/" + d.getDate() + " " + hm : hm;
  }

  // -- drawing ---------------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  function el(name, attrs, parent) {
    const e = document.createElementNS(SVG, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function frame(box, unit, lo, hi) {
    const W = Math.max(box.clientWidth, 200), H = 190, L = 64, R = 8, T = 8, B = 20;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    const top = niceMax(hi), bottom = lo < 0 ? -niceMax(-lo) : 0;
    const y = (v) => T + (H - T - B) * (1 - (v - bottom) / (top - bottom || 1));
    const axis = el("g", { class: "axis" }, svg);
    for (let i = 0; i <= 4; i++) {
      const v = bottom + (top - bottom) * i / 4;
      el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }, axis);
      const t = el("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, axis);
      t.textContent = format(unit, v);
    }
    return { svg, W, H, L, R, T, B, y, axis };
  }

  function legendOf(names, values, unit) {
    const div = document.createElement("div");
    div.className = "legend";
    names.forEach((n, i) => {
      const s = document.createElement("span");
      s.style.setProperty("--c", PALETTE[i % PALETTE.length]);
      s.textContent = values ? `${n}: ${format(unit, values[i])}` : n;
      div.appendChild(s);
    });
    return div;
  }

  function drawLines(panel, unit, series, start, end) {
    const box = panel.querySelector(".chart");
    let lo = Infinity, hi = -Infinity, points = 0;
    for (const s of series) for (const v of s.values) if (v !== null && isFinite(v)) {
      lo = Math.min(lo, v); hi = Math.max(hi, v); points++;
    }
    if (!points) return 0;
    const f = frame(box, unit, Math.min(lo, 0), hi);
    const x = (t) => f.L + (f.W - f.L - f.R) * (t - start) / (end - start || 1);
    for (let i = 0; i <= 4; i++) {
      const t = start + (end - start) * i / 4;
      const label = el("text", { x: x(t), y: f.H - 6, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, f.axis);
      label.textContent = clock(t, end - start);
    }
    series.forEach((s, i) => {
      let d = "", pen = "M";
      let single = null;
      s.times.forEach((t, j) => {
        const v = s.values[j];
        if (v === null || !isFinite(v)) { pen = "M"; return; }
        d += `${pen}${x(t).toFixed(1)},${f.y(v).toFixed(1)}`;
        pen = "L";
        single = [x(t), f.y(v)];
      });
      const color = PALETTE[i % PALETTE.length];
      el("path", { d, fill: "none", stroke: color, "stroke-width": 1.5, class: "series" }, f.svg);
      if (s.times.length === 1 && single) el("circle", { cx: single[0], cy: single[1], r: 3, fill: color }, f.svg);
    });
    box.replaceChildren(f.svg);
    hover(box, f, series, unit, x, start, end);
    const last = series.map((s) => { for (let j = s.values.length - 1; j >= 0; j--) if (s.values[j] !== null) return s.values[j]; return null; });
    box.after(legendOf(series.map((s) => s.name), last, unit));
    return points;
  }

  function hover(box, f, series, unit, x, start, end) {
    const tip = document.createElement("div");
    tip.className = "tip"; tip.hidden = true;
    box.appendChild(tip);
    const guide = el("line", { y1: f.T, y2: f.H - f.B, stroke: "#888", "stroke-dasharray": "2 2", visibility: "hidden" }, f.svg);
    f.svg.addEventListener("mousemove", (ev) => {
      const r = f.svg.getBoundingClientRect();
      const px = (ev.clientX - r.left) * f.W / r.width;
      const t = start + (px - f.L) / (f.W - f.L - f.R) * (end - start);
      const lines = [clock(t, end - start)];
      series.slice(0, 8).forEach((s) => {
        let best = -1, gap = Infinity;
        s.times.forEach((st, j) => { if (Math.abs(st - t) < gap) { gap = Math.abs(st - t); best = j; } });
        if (best >= 0) lines.push(`${s.name}: ${format(unit, s.values[best])}`);
      });
      tip.textContent = lines.join("\n");
      tip.style.whiteSpace = "pre";
      tip.style.left = Math.min(ev.clientX - r.left + 12, r.width - 160) + "px";
      tip.style.top = "8px";
      tip.hidden = false;
      guide.setAttribute("x1", px); guide.setAttribute("x2", px);
      guide.setAttribute("visibility", "visible");
    });
    f.svg.addEventListener("mouseleave", () => { tip.hidden = true; guide.setAttribute("visibility", "hidden"); });
  }

  function drawBars(panel, unit, categories, series) {
    const box = panel.querySelector(".chart");
    let lo = 0, hi = -Infinity, points = 0;
    for (const s of series) for (const v of s.values) if (v !== null && isFinite(v)) {
      lo = Math.min(lo, v); hi = Math.max(hi, v); points++;
    }
    if (!points || !categories.length) return 0;
    const f = frame(box, unit, lo, hi);
    const group = (f.W - f.L - f.R) / categories.length;
    const bar = Math.max(2, (group * 0.8) / series.length);
    categories.forEach((c, i) => {
      const gx = f.L + group * i + group * 0.1;
      series.forEach((s, k) => {
        const v = s.values[i];
        if (v === null || !isFinite(v)) return;
        const y0 = f.y(0), y1 = f.y(v);
        const rect = el("rect", { x: gx + k * bar, y: Math.min(y0, y1), width: bar - 1, height: Math.max(1, Math.abs(y1 - y0)), fill: PALETTE[k % PALETTE.length], class: "series" }, f.svg);
        el("title", {}, rect).textContent = `${c} ${s.name}: ${format(unit, v)}`;
      });
      const label = el("text", { x: gx + group * 0.4, y: f.H - 6, "text-anchor": "middle" }, f.axis);
      label.textContent = c.length > 18 ? c.slice(0, 17) + "…" : c;
    });
    box.replaceChildren(f.svg);
    box.after(legendOf(series.map((s) => s.name), null, unit));
    return points;
  }

  function setState(panel, kind, text, points) {
    panel.dataset.state = kind;
    panel.dataset.points = String(points || 0);
    panel.querySelectorAll(".legend").forEach((n) => n.remove());
    if (text !== null) {
      const m = document.createElement("div");
      m.className = "message";
      m.textContent = text;
      panel.querySelector(".chart").replaceChildren(m);
    }
  }

  // -- dashboards ------------------------------------------------------------------------------

  function range() {
    const span = Number($("range").value);
    const end = Date.now() / 1000;
    return { start: end - span, end };
  }

  function variableQuery() {
    const q = new URLSearchParams();
    document.querySelectorAll("#variables select").forEach((s) => {
      if (s.value && s.value !== "All") q.set(s.name, s.value);
    });
    return q;
  }

  function panelBox(title, unit, source) {
    const div = document.createElement("section");
    div.className = "panel";
    div.dataset.state = "loading";
    div.dataset.source = source;
    div.dataset.unit = unit;
    const h = document.createElement("h3");
    h.textContent = title;
    const chart = document.createElement("div");
    chart.className = "chart";
    div.append(h, chart);
    setState(div, "loading", "Loading…", 0);
    return div;
  }

  async function refreshPanel(div, uid, generation) {
    const { start, end } = range();
    const q = variableQuery();
    q.set("dashboard", uid);
    q.set("panel", div.dataset.index);
    q.set("start", start.toFixed(0));
    q.set("end", end.toFixed(0));
    const ledger = div.dataset.source === "ledger";
    if (ledger) { q.delete("model"); q.delete("deployment"); q.delete("team"); }
    try {
      const data = await api((ledger ? "/v1/ledger?" : "/v1/query?") + q.toString());
      if (generation !== state.generation) return;
      setState(div, "drawn", null, 0);
      let points;
      if (ledger && data.kind === "bars") points = drawBars(div, div.dataset.unit, data.categories, data.series);
      else points = drawLines(div, div.dataset.unit, data.series, data.start, data.end);
      if (!points) setState(div, "empty", "No data in this range.", 0);
      else div.dataset.points = String(points);
    } catch (err) {
      if (failed(err) || generation !== state.generation) return;
      setState(div, "error", err.message, 0);
    }
  }

  async function refresh() {
    const board = state.board;
    if (!board) return;
    const generation = state.generation;
    const panels = [...document.querySelectorAll("main .panel")];
    await Promise.all(panels.map((p) => refreshPanel(p, board.dashboard.uid, generation)));
    if (generation === state.generation) document.body.dataset.refreshed = String(Date.now());
  }

  async function loadVariables(dashboard) {
    const box = $("variables");
    box.replaceChildren();
    const { start, end } = range();
    for (const v of dashboard.templating.list.filter((v) => v.type === "query")) {
      const label = document.createElement("label");
      label.textContent = (v.label || v.name) + " ";
      const select = document.createElement("select");
      select.name = v.name;
      select.add(new Option("All", "All"));
      label.appendChild(select);
      box.appendChild(label);
      select.addEventListener("change", restart);
      try {
        const q = new URLSearchParams({ start: start.toFixed(0), end: end.toFixed(0) });
        const got = await api(`/v1/variables/${v.name}?` + q);
        for (const value of got.values) select.add(new Option(value, value));
      } catch (err) {
        if (failed(err)) return;
        select.title = err.message; // Prometheus down: "All" still works for the ledger panels
      }
    }
  }

  async function openBoard(uid) {
    state.generation++;
    const generation = state.generation;
    document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.uid === uid));
    let board;
    try {
      board = await api("/v1/console/" + encodeURIComponent(uid));
    } catch (err) {
      if (failed(err)) return;
      $("main").replaceChildren(Object.assign(document.createElement("p"), { textContent: err.message }));
      return;
    }
    if (generation !== state.generation) return;
    state.board = board;
    document.title = board.dashboard.title + " · Citadel console";
    const g = $("grafana");
    g.hidden = !board.grafana_url;
    if (board.grafana_url) g.href = board.grafana_url;
    const main = $("main");
    main.replaceChildren();
    board.dashboard.panels.forEach((p, i) => {
      const div = panelBox(p.title, (p.fieldConfig.defaults || {}).unit || "short", "prometheus");
      div.dataset.index = String(i);
      main.appendChild(div);
    });
    if (board.ledger.length) {
      const h = document.createElement("h2");
      h.textContent = "From the usage ledger (no Prometheus needed)";
      main.appendChild(h);
      board.ledger.forEach((p) => {
        const div = panelBox(p.title, p.unit, "ledger");
        div.dataset.index = String(p.index);
        main.appendChild(div);
      });
    }
    await loadVariables(board.dashboard);
    if (generation !== state.generation) return;
    await refresh();
    startTimer();
  }

  function stopTimer() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  function startTimer() {
    stopTimer();
    const every = Number($("refresh").value);
    if (every > 0) state.timer = setInterval(refresh, every * 1000);
  }

  // A new range or variable: answers still in flight for the old one are dropped.
  function restart() {
    state.generation++;
    refresh();
    startTimer();
  }

  $("range").addEventListener("change", restart);
  $("refresh").addEventListener("change", startTimer);
  window.addEventListener("hashchange", () => route());

  function route() {
    const uid = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
    const known = state.boards.find((b) => b.uid === uid);
    if (!known) {
      if (state.boards.length) location.replace("#/" + state.boards[0].uid);
      return;
    }
    openBoard(uid);
  }

  async function start() {
    if (!sessionStorage.getItem(KEY)) return showLogin("");
    try {
      state.boards = await api("/v1/dashboards");
    } catch (err) {
      if (!failed(err)) showLogin(err.message);
      return;
    }
    $("login").hidden = true;
    $("controls").hidden = false;
    const tabs = $("tabs");
    tabs.replaceChildren(...state.boards.map((b) => {
      const a = document.createElement("a");
      a.href = "#/" + b.uid;
      a.dataset.uid = b.uid;
      a.textContent = b.title.replace(/^Citadel \/ /, "");
      return a;
    }));
    route();
  }

  start();
})();
