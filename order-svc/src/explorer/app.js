// Saga Explorer: plain JavaScript, no framework, no build step.
//
// Reads order-svc's API: GET /sagas (the list), GET /sagas/stats (the
// headline), GET /sagas/{order_id} (one saga's timeline) and
// GET /sagas/choreography (who reacts to what). The data holds
// customer-controlled strings, so every value reaches the page as text
// (textContent, text nodes, attributes), never as markup.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "saga-explorer.api-token";
  const REFRESH_MS = 2000;
  const CHOREOGRAPHY_RETRY_MS = 30000;
  const SERVICE_COLOURS = {
    "order-svc": "#3b82f6",
    "payment-svc": "#10b981",
    "inventory-svc": "#f59e0b",
    "notification-svc": "#8b5cf6",
  };
  const SPARE_COLOURS = ["#06b6d4", "#ec4899", "#84cc16", "#64748b", "#f97316"];

  const state = {
    selected: null,
    busy: false,
    again: false,
    needToken: false,
    detailSeq: 0,
    lastDetailJson: null,
    lastListJson: null,
    choreographyNextTry: 0,
    choreographyLoaded: false,
  };

  const $ = (id) => document.getElementById(id);

  // ----- DOM helpers: text only -----

  function append(node, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  /** An HTML element; `attrs` are attributes (strings), `class` included. */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, String(v));
    }
    return append(node, children);
  }

  /** An SVG element. */
  function s(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, String(v));
    }
    return append(node, children);
  }

  function setText(node, text) {
    node.textContent = text === null || text === undefined ? "" : String(text);
  }

  // ----- formatting -----

  function fmtMs(ms) {
    if (ms === null || ms === undefined || Number.isNaN(Number(ms))) return "–";
    const n = Number(ms);
    if (Math.abs(n) < 1000) return `${Math.round(n)} ms`;
    if (Math.abs(n) < 60000) return `${(n / 1000).toFixed(n < 10000 ? 2 : 1)} s`;
    return `${(n / 60000).toFixed(1)} min`;
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const hms = d.toLocaleTimeString([], { hour12: false });
    return `${hms}.${String(d.getMilliseconds()).padStart(3, "0")}`;
  }

  function fmtDateTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return `${d.toLocaleDateString()} ${fmtTime(iso)}`;
  }

  function fmtMoney(cents) {
    if (cents === null || cents === undefined) return "–";
    return (Number(cents) / 100).toFixed(2);
  }

  function num(v) {
    const n = Number(v);
    return Number.isFinite(n) ? n : 0;
  }

  const spareColour = new Map();
  function colourOf(service) {
    if (SERVICE_COLOURS[service]) return SERVICE_COLOURS[service];
    if (!spareColour.has(service)) {
      spareColour.set(service, SPARE_COLOURS[spareColour.size % SPARE_COLOURS.length]);
    }
    return spareColour.get(service);
  }

  function statusBadge(status, stuck, awaiting) {
    const known = ["PENDING", "CONFIRMED", "FAILED"].includes(status) ? status : "";
    const span = h("span", { class: `status ${known}` }, status || "?");
    const extra = [];
    // A long-running saga (waiting for an outside answer, e.g. 3-D Secure).
    if (awaiting) {
      extra.push(h("span", { class: "status long", title: `long-running: ${awaiting}` }, "LONG"));
    }
    if (stuck) {
      extra.push(h("span", { class: "status stuck", title: "undecided past its deadline, or a compensation not done" }, "STUCK"));
    }
    if (extra.length === 0) return span;
    return h("span", {}, span, ...extra);
  }

  // ----- API -----

  class Unauthorized extends Error {}

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    const r = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (r.status === 401) {
      throw new Unauthorized(t ? "That token was refused: enter the API token." : "");
    }
    let body = null;
    try {
      body = await r.json();
    } catch {
      body = null;
    }
    if (!r.ok) {
      const e = new Error(`${path}: ${(body && body.error) || `HTTP ${r.status}`}`);
      e.status = r.status;
      throw e;
    }
    return body;
  }

  // ----- token -----

  function askForToken(message) {
    state.needToken = true;
    $("token-form").hidden = false;
    setText($("token-message"), message);
    $("token-input").focus();
  }

  function useToken(event) {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!/^[\x21-\x7e]+$/.test(value)) {
      setText($("token-message"), "A token is one or more visible ASCII characters.");
      return;
    }
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch {
      setText($("token-message"), "This browser does not keep it (sessionStorage is off).");
      return;
    }
    $("token-input").value = "";
    $("token-form").hidden = true;
    $("forget-token").hidden = false;
    state.needToken = false;
    refresh();
  }

  function forgetToken() {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // nothing kept
    }
    $("forget-token").hidden = true;
    refresh();
  }

  // ----- error banner -----

  function showError(message) {
    const banner = $("error");
    banner.hidden = !message;
    setText(banner, message || "");
  }

  // ----- the list -----

  function listQuery() {
    const p = new URLSearchParams();
    const status = $("filter-status").value;
    if (status) p.set("status", status);
    if ($("filter-stuck").checked) p.set("stuck", "true");
    p.set("limit", $("filter-limit").value || "50");
    return `/sagas?${p}`;
  }

  async function loadList() {
    const body = await api(listQuery());
    renderList((body && body.sagas) || []);
  }

  function renderList(sagas) {
    // Unchanged: keep the rows (and what the mouse is on).
    const json = JSON.stringify([sagas, state.selected]);
    if (json === state.lastListJson) return;
    state.lastListJson = json;
    const rows = sagas.map((saga) => {
      const classes = [saga.order_id === state.selected ? "selected" : "", saga.stuck ? "stuck" : ""];
      const outcome = saga.error ? `${saga.error}${saga.reason ? `: ${saga.reason}` : ""}` : "";
      return h(
        "tr",
        { "data-order-id": saga.order_id, "data-status": saga.status, class: classes.join(" ").trim(), tabindex: "0" },
        // UUIDv7: the leading digits are the time, the trailing ones tell orders apart.
        h("td", { class: "mono", title: saga.order_id }, `…${String(saga.order_id).slice(-12)}`),
        h("td", {}, statusBadge(saga.status, saga.stuck, saga.awaiting)),
        h("td", { class: "wrap" }, saga.customer_id),
        h("td", { class: "num" }, fmtMoney(saga.amount_cents)),
        h("td", { class: "num" }, fmtMs(saga.duration_ms)),
        h("td", { title: saga.created_at }, fmtTime(saga.created_at)),
        h("td", { class: "wrap" }, outcome),
      );
    });
    $("saga-rows").replaceChildren(...rows);
    $("list-empty").hidden = rows.length > 0;
  }

  function rowEvent(event) {
    if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") return;
    const tr = event.target.closest("tr[data-order-id]");
    if (!tr) return;
    event.preventDefault();
    select(tr.getAttribute("data-order-id"));
  }

  // ----- the headline -----

  async function loadStats() {
    const minutes = $("stats-window").value || "5";
    const stats = await api(`/sagas/stats?minutes=${encodeURIComponent(minutes)}`);
    renderStats(stats || {});
  }

  function renderStats(stats) {
    const minutes = num(stats.window_minutes) || 1;
    for (const key of ["started", "confirmed", "failed", "pending", "long_running_pending"]) {
      const node = document.querySelector(`[data-stat="${key}"]`);
      if (node) setText(node, stats[key] ?? "–");
    }
    for (const key of ["p50_ms", "p99_ms"]) {
      const node = document.querySelector(`[data-stat="${key}"]`);
      if (node) setText(node, fmtMs(stats[key]));
    }
    for (const key of ["started", "confirmed", "failed"]) {
      const node = document.querySelector(`[data-rate="${key}"]`);
      if (node) setText(node, `(${(num(stats[key]) / minutes).toFixed(1)}/min)`);
    }
    const reasons = Object.entries(stats.failed_by_reason || {}).sort((a, b) => num(b[1]) - num(a[1]));
    const chips = reasons.map(([error, n]) => h("span", { class: "chip bad" }, `${error}: ${n}`));
    if (chips.length === 0) chips.push(h("span", { class: "muted" }, "none"));
    $("failed-by-reason").replaceChildren(...chips);
  }

  // ----- one saga -----

  function select(orderId) {
    if (!orderId) return;
    state.selected = orderId;
    state.lastDetailJson = null;
    for (const tr of $("saga-rows").querySelectorAll("tr[data-order-id]")) {
      tr.classList.toggle("selected", tr.getAttribute("data-order-id") === orderId);
    }
    if (location.hash !== `#${orderId}`) history.replaceState(null, "", `#${orderId}`);
    setText($("detail-id"), orderId);
    $("detail-hint").hidden = false;
    setText($("detail-hint"), "Loading…");
    loadDetail(orderId).catch(handleFailure);
  }

  async function loadDetail(orderId) {
    const seq = ++state.detailSeq;
    let saga;
    try {
      saga = await api(`/sagas/${encodeURIComponent(orderId)}`);
    } catch (e) {
      if (seq !== state.detailSeq) return;
      if (e.status === 404) {
        $("detail-body").hidden = true;
        $("detail-hint").hidden = false;
        setText($("detail-hint"), `No saga ${orderId}.`);
        return;
      }
      throw e;
    }
    if (seq !== state.detailSeq || state.selected !== orderId) return;
    const json = JSON.stringify(saga);
    if (json === state.lastDetailJson) return;
    state.lastDetailJson = json;
    renderDetail(saga || {});
  }

  function fact(term, ...value) {
    return [h("dt", {}, term), h("dd", {}, ...value)];
  }

  function renderDetail(saga) {
    $("detail-hint").hidden = true;
    $("detail-body").hidden = false;
    const d = saga.decision;
    const facts = [
      ...fact("status", statusBadge(saga.status, false)),
      ...fact("created", fmtDateTime(saga.created_at)),
      ...fact("deadline", fmtDateTime(saga.deadline_at)),
      ...fact("decided", saga.decided_at ? fmtDateTime(saga.decided_at) : "not yet"),
      ...fact("duration", fmtMs(saga.duration_ms)),
    ];
    if (d) {
      const parts = [d.outcome, d.failed_step ? `at ${d.failed_step}` : null].filter(Boolean).join(" ");
      facts.push(...fact("decision", parts || "–"));
      if (d.error || d.reason) {
        facts.push(...fact("error", [d.error, d.reason].filter(Boolean).join(": ")));
      }
    }
    $("detail-facts").replaceChildren(...facts);

    const sources = Object.entries(saga.sources || {}).map(([service, status]) =>
      h("span", { class: `chip ${status === "ok" ? "ok" : "bad"}`, title: String(status) }, `${service}: ${status}`),
    );
    $("detail-sources").replaceChildren(...sources);

    const steps = Array.isArray(saga.steps) ? saga.steps : [];
    $("timeline").replaceChildren(drawTimeline(saga, steps));
    $("step-rows").replaceChildren(
      ...steps.map((step) =>
        h(
          "tr",
          {
            class: [isFailure(step) ? "failed" : "", step.kind === "compensation" ? "compensation" : ""].join(" ").trim(),
            "data-event": step.event,
          },
          h("td", { class: "num" }, step.since_start_ms ?? "–"),
          h("td", { class: "num" }, step.since_previous_ms ?? "–"),
          h("td", {}, step.service),
          h("td", { class: "mono" }, step.event),
          h("td", {}, step.kind),
          h("td", {}, step.outcome),
          h("td", {}, step.state),
          h("td", { class: "wrap" }, step.detail),
        ),
      ),
    );

    const comps = (saga.compensations || []).map((c) =>
      h(
        "li",
        {},
        h("span", { class: `chip ${c.state === "done" ? "ok" : "bad"}` }, c.state || "?"),
        ` ${c.service || "?"} · ${c.step || "?"} `,
        h("span", { class: "muted" }, `${fmtTime(c.at)}${c.detail ? ` — ${c.detail}` : ""}`),
      ),
    );
    $("compensations").replaceChildren(...(comps.length ? comps : [h("li", { class: "muted" }, "none")]));
    const emails = (saga.emails || []).map((e) =>
      h("li", {}, `${e.kind || "?"} `, h("span", { class: "muted" }, fmtTime(e.sent_at))),
    );
    $("emails").replaceChildren(...(emails.length ? emails : [h("li", { class: "muted" }, "none")]));
  }

  // A failed step: a failure event (payment.failed, order.failed...) or a
  // failed outcome. A compensation reacts to order.failed: it failed only
  // if its own outcome says so.
  function isFailure(step) {
    const outcome = String(step.outcome || "").toLowerCase();
    if (outcome === "failed") return true;
    if (step.kind === "compensation") return false;
    return /\.failed$/.test(String(step.event || ""));
  }

  /** A tick step of 1, 2 or 5 × 10^k giving about `count` ticks up to `max`. */
  function tickStep(max, count) {
    const raw = max / count;
    const p = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
    return 10 * p;
  }

  // The timeline: one row per step, a bar from the previous step to this
  // one on a time axis starting at the saga's creation; the deadline as a
  // vertical line; failures and compensations marked; a legend.
  function drawTimeline(saga, steps) {
    const W = 900;
    const labelW = 230;
    const padR = 70;
    const top = 28;
    const rowH = 22;
    const created = Date.parse(saga.created_at);
    const deadlineMs = saga.deadline_at && !Number.isNaN(created) ? Date.parse(saga.deadline_at) - created : null;
    const ends = steps.map((st) => num(st.since_start_ms));
    const lastMs = Math.max(1, ...ends, num(saga.duration_ms));
    // A deadline far past the last step would squash the steps into the
    // first pixels: then it is drawn at the right edge, marked off scale.
    const hasDeadline = deadlineMs !== null && Number.isFinite(deadlineMs);
    const deadlineOffScale = hasDeadline && steps.length > 0 && deadlineMs > 2 * lastMs;
    const rawMax = hasDeadline && !deadlineOffScale ? Math.max(lastMs, deadlineMs) : lastMs;
    const step = tickStep(rawMax, 6);
    const maxMs = Math.ceil((rawMax * 1.02) / step) * step;
    const x = (ms) => labelW + (Math.max(0, ms) / maxMs) * (W - labelW - padR);
    const rowsBottom = top + Math.max(steps.length, 1) * rowH;
    const services = [...new Set(["order-svc", "payment-svc", "inventory-svc", "notification-svc", ...steps.map((st) => st.service)])].filter(Boolean);
    const legendY = rowsBottom + 30;
    const H = legendY + 36;

    const root = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "saga timeline" });
    root.append(s("title", {}, `Timeline of saga ${saga.order_id || ""}`));

    // Axis and grid.
    const axis = s("g", { class: "axis" });
    for (let t = 0; t <= maxMs + 1e-9; t += step) {
      axis.append(
        s("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 6, y2: rowsBottom }),
        s("text", { x: x(t), y: top - 10, "text-anchor": "middle" }, fmtMs(t)),
      );
    }
    root.append(axis);

    if (steps.length === 0) {
      root.append(s("text", { x: labelW, y: top + 15, class: "note" }, "no steps recorded yet"));
    }

    steps.forEach((st, i) => {
      const y = top + i * rowH;
      const end = num(st.since_start_ms);
      const start = Math.max(0, end - num(st.since_previous_ms));
      let x0 = x(start);
      let w = x(end) - x0;
      if (w < 3) {
        x0 = x(end) - 1.5;
        w = 3;
      }
      const failed = isFailure(st);
      const comp = st.kind === "compensation";
      const cls = ["bar", failed ? "failed" : "", comp ? "compensation" : ""].join(" ").trim();
      const g = s("g", { class: "step", "data-event": st.event });
      g.append(
        s("title", {}, [
          `${st.service || "?"} · ${st.event || "?"}`,
          `kind: ${st.kind || "–"}, outcome: ${st.outcome || "–"}${st.state ? `, state: ${st.state}` : ""}`,
          `at +${fmtMs(end)} (took ${fmtMs(st.since_previous_ms)}) — ${fmtTime(st.at)}`,
          st.detail ? `detail: ${st.detail}` : "",
        ].filter(Boolean).join("\n")),
        s("rect", { x: 6, y: y + 5, width: 10, height: 10, rx: 2, fill: colourOf(st.service) }),
        s("text", { x: 22, y: y + 14, class: failed ? "label-failed" : "" }, st.event || "?"),
        s("text", { x: labelW - 8, y: y + 14, "text-anchor": "end", class: "note" }, st.service || ""),
        s("rect", { x: x0, y: y + 4, width: w, height: rowH - 8, rx: 2, fill: colourOf(st.service), "fill-opacity": comp ? 0.45 : 0.9, class: cls }),
      );
      let markX = x0 + w + 4;
      if (failed) {
        g.append(s("text", { x: markX, y: y + 15, class: "mark-failed" }, "✕"));
        markX += 12;
      }
      if (comp) {
        g.append(s("text", { x: markX, y: y + 15, class: "mark-comp" }, "↺"));
        markX += 12;
        if (st.state && st.state !== "done") {
          g.append(s("text", { x: markX, y: y + 15, class: "warn" }, st.state));
        }
      }
      root.append(g);
    });

    // The deadline, and the decision.
    if (hasDeadline) {
      const dx = deadlineOffScale ? W - padR + 40 : x(deadlineMs);
      const label = deadlineOffScale ? `deadline at ${fmtMs(deadlineMs)} →` : "deadline";
      root.append(
        s("line", { class: "deadline", x1: dx, x2: dx, y1: top - 4, y2: rowsBottom + 4 }),
        s("text", { class: "deadline-label", x: dx, y: rowsBottom + 14, "text-anchor": "end" }, label),
      );
    }

    // Legend.
    const legend = s("g", { class: "legend" });
    let lx = 6;
    const ly = legendY;
    for (const svc of services) {
      legend.append(
        s("rect", { x: lx, y: ly - 9, width: 14, height: 10, rx: 2, fill: colourOf(svc) }),
        s("text", { x: lx + 18, y: ly }, svc),
      );
      lx += 28 + svc.length * 6.5;
    }
    const ly2 = ly + 20;
    legend.append(
      s("rect", { x: 6, y: ly2 - 9, width: 14, height: 10, rx: 2, fill: "#e5e7eb", class: "bar failed" }),
      s("text", { x: 24, y: ly2 }, "✕ failure"),
      s("rect", { x: 100, y: ly2 - 9, width: 14, height: 10, rx: 2, fill: "#e5e7eb", class: "bar compensation" }),
      s("text", { x: 118, y: ly2 }, "↺ compensation"),
      s("line", { x1: 230, x2: 230, y1: ly2 - 11, y2: ly2 + 2, class: "deadline" }),
      s("text", { x: 236, y: ly2 }, "deadline"),
      s("text", { x: 320, y: ly2, class: "note" }, "bar: from the previous step to this one, from the order's creation"),
    );
    root.append(legend);
    return root;
  }

  // ----- the choreography -----

  async function loadChoreography() {
    if (state.choreographyLoaded || Date.now() < state.choreographyNextTry) return;
    state.choreographyNextTry = Date.now() + CHOREOGRAPHY_RETRY_MS;
    let body;
    try {
      body = await api("/sagas/choreography");
    } catch (e) {
      if (e instanceof Unauthorized) throw e;
      $("choreo-diagram").replaceChildren(h("p", { class: "muted" }, `Choreography not available: ${e.message}`));
      return;
    }
    state.choreographyLoaded = true;
    setText($("choreo-mermaid"), (body && body.mermaid) || "");
    const reactions = Array.isArray(body && body.reactions) ? body.reactions : [];
    $("choreo-diagram").replaceChildren(drawChoreography(reactions));
  }

  // A reaction as the page draws it. Accepts the compact shape
  // ({service, on, emits, kind, compensated_by, irreversible}) and the
  // declared one ({service, step, on: [{kind, event}], outcomes: [[...]],
  // kind, delivery, undo: {kind, step | why}}).
  function normalizeReaction(r) {
    const label = (t) => {
      if (typeof t === "string") return t;
      if (t && t.kind === "deadline") return "deadline passed";
      return (t && (t.event || t.kind)) || "?";
    };
    const on = Array.isArray(r.on) ? r.on.map(label) : r.on ? [label(r.on)] : [];
    let outs = [];
    if (Array.isArray(r.outcomes)) {
      outs = r.outcomes.map((alt) => (Array.isArray(alt) && alt.length ? alt.map(String).join(" + ") : "(nothing)"));
    } else if (Array.isArray(r.emits)) {
      outs = r.emits.map((e) => (Array.isArray(e) ? e.map(String).join(" + ") : String(e)));
    }
    const undo = r.undo && typeof r.undo === "object" ? r.undo : {};
    let compensatedBy = r.compensated_by || (undo.kind === "compensated_by" ? undo.step : null);
    if (compensatedBy && typeof compensatedBy === "object") compensatedBy = compensatedBy.step || JSON.stringify(compensatedBy);
    let irreversible = r.irreversible || (undo.kind === "irreversible" ? undo.why || true : null);
    return {
      service: String(r.service || "?"),
      step: r.step ? String(r.step) : "",
      on,
      outs,
      kind: r.kind ? String(r.kind) : "",
      delivery: r.delivery ? String(r.delivery) : "",
      compensatedBy: compensatedBy ? String(compensatedBy) : "",
      irreversible,
    };
  }

  // One row per reaction: the events it reacts to → the service (and its
  // step) → its alternative outcomes; compensations dashed; what undoes it
  // and irreversibility noted.
  function drawChoreography(reactions) {
    const W = 920;
    const evX = 8;
    const evW = 190;
    const svcX = 240;
    const svcW = 170;
    const outX = 455;
    const outW = 230;
    const noteX = 700;
    const lineH = 26;
    const gap = 12;
    let y = 8;
    const parts = [];
    for (const raw of reactions) {
      const r = normalizeReaction(raw || {});
      const rows = Math.max(1, r.on.length, r.outs.length, r.step ? 2 : 1);
      const h0 = rows * lineH;
      const midY = y + h0 / 2;
      const dashed = r.kind === "compensation" ? "edge comp" : "edge";
      const g = s("g", { class: "reaction", "data-service": r.service });
      g.append(s("title", {}, `${r.service}${r.step ? ` · ${r.step}` : ""}${r.kind ? ` (${r.kind}${r.delivery ? `, ${r.delivery}` : ""})` : ""}`));
      const onY = (i) => midY + (i - (r.on.length - 1) / 2) * lineH;
      r.on.forEach((ev, i) => {
        const ey = onY(i);
        g.append(
          s("rect", { x: evX, y: ey - 10, width: evW, height: 20, rx: 10, class: "event-node" }),
          s("text", { x: evX + evW / 2, y: ey + 4, "text-anchor": "middle" }, ev),
          s("path", { d: `M${evX + evW},${ey} C${evX + evW + 20},${ey} ${svcX - 26},${midY} ${svcX - 6},${midY}`, class: dashed, "marker-end": "url(#arrow)" }),
        );
      });
      g.append(s("rect", { x: svcX, y: midY - (r.step ? 18 : 12), width: svcW, height: r.step ? 36 : 24, rx: 4, fill: colourOf(r.service) }));
      g.append(s("text", { x: svcX + svcW / 2, y: midY + (r.step ? -3 : 4), "text-anchor": "middle", class: "service-label" }, r.service));
      if (r.step) g.append(s("text", { x: svcX + svcW / 2, y: midY + 12, "text-anchor": "middle", class: "service-label" }, r.step));
      const outY = (i) => midY + (i - (r.outs.length - 1) / 2) * lineH;
      r.outs.forEach((ev, i) => {
        const ey = outY(i);
        const failedPath = i > 0 || /\.failed|cancelled/.test(ev);
        g.append(
          s("path", { d: `M${svcX + svcW},${midY} C${svcX + svcW + 25},${midY} ${outX - 30},${ey} ${outX - 6},${ey}`, class: failedPath ? "edge comp" : dashed, "marker-end": "url(#arrow)" }),
          s("rect", { x: outX, y: ey - 10, width: outW, height: 20, rx: 10, class: "event-node terminal" }),
          s("text", { x: outX + outW / 2, y: ey + 4, "text-anchor": "middle", class: failedPath && ev !== "(nothing)" ? "label-failed" : "" }, ev),
        );
      });
      const notes = [];
      if (r.kind) notes.push([r.kind, "note", null]);
      if (r.compensatedBy) notes.push([`undone by ${r.compensatedBy}`, "note", null]);
      if (r.irreversible) notes.push(["⚠ irreversible", "warn", typeof r.irreversible === "string" ? r.irreversible : null]);
      notes.forEach(([text, cls, why], i) => {
        const t = s("text", { x: noteX, y: midY - ((notes.length - 1) * 13) / 2 + i * 13 + 4, class: cls }, text);
        if (why) t.append(s("title", {}, why));
        g.append(t);
      });
      parts.push(g);
      y += h0 + gap;
    }
    const H = Math.max(y, 30);
    const root = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "saga choreography" });
    root.append(
      s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9ca3af" }))),
      ...parts,
    );
    if (reactions.length === 0) root.append(s("text", { x: 8, y: 20, class: "note" }, "no reactions listed"));
    return root;
  }

  // ----- refresh loop -----

  function handleFailure(e) {
    if (e instanceof Unauthorized) {
      askForToken(e.message);
    } else {
      showError(e && e.message ? e.message : String(e));
    }
  }

  async function refresh() {
    if (state.needToken) return;
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    try {
      await Promise.all([loadList(), loadStats()]);
      if (state.selected) await loadDetail(state.selected);
      await loadChoreography();
      showError(null);
      setText($("updated"), `updated ${fmtTime(new Date().toISOString())}`);
    } catch (e) {
      handleFailure(e);
    } finally {
      state.busy = false;
    }
    if (state.again) {
      state.again = false;
      refresh();
    }
  }

  function start() {
    // A violation of the page's Content-Security-Policy is a bug: say so.
    document.addEventListener("securitypolicyviolation", (e) => {
      const n = Number(document.body.getAttribute("data-csp-violations") || "0") + 1;
      document.body.setAttribute("data-csp-violations", String(n));
      showError(`Content-Security-Policy blocked ${e.blockedURI || "something"} (${e.violatedDirective})`);
    });
    $("token-form").addEventListener("submit", useToken);
    $("forget-token").addEventListener("click", forgetToken);
    $("forget-token").hidden = !token();
    $("refresh").addEventListener("click", () => refresh());
    for (const id of ["filter-status", "filter-stuck", "filter-limit", "stats-window"]) {
      $(id).addEventListener("change", () => refresh());
    }
    $("saga-rows").addEventListener("click", rowEvent);
    $("saga-rows").addEventListener("keydown", rowEvent);
    setInterval(() => {
      if ($("live").checked && !document.hidden) refresh();
    }, REFRESH_MS);
    const fromHash = decodeURIComponent(location.hash.slice(1));
    if (/^[0-9a-fA-F-]{36}$/.test(fromHash)) select(fromHash);
    refresh();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
