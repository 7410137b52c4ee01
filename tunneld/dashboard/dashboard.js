"use strict";
const params = new URLSearchParams(location.hash.slice(1));
let token = params.get("token") || "";
const $ = (id) => document.getElementById(id);

function el(tag, cls, ...kids) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const k of kids.flat()) {
    if (k === null || k === undefined) continue;
    e.append(k instanceof Node ? k : String(k));
  }
  return e;
}
function pill(text, kind) { return el("span", "pill" + (kind ? " " + kind : ""), text); }
function dur(s) {
  if (s === null || s === undefined) return "-";
  s = Math.max(0, s);
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + Math.floor(s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor(s % 3600 / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
}
// Times carry their date and time zone: a failure row from yesterday, or read from another zone, stays true.
function zone(date) {
  const off = -date.getTimezoneOffset(), a = Math.abs(off);
  if (!off) return "UTC";
  return "UTC" + (off > 0 ? "+" : "-") + String(Math.floor(a / 60)).padStart(2, "0") + ":" + String(a % 60).padStart(2, "0");
}
function stamp(t) {
  const d = new Date(t * 1000), p = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + p(d.getHours()) + ":" +
    p(d.getMinutes()) + ":" + p(d.getSeconds()) + " " + zone(d);
}
function ms(s) { return s === null || s === undefined ? "-" : (s * 1000).toFixed(1) + " ms"; }
function failed(k) { return !["1xx", "2xx", "3xx", "OK"].includes(k); }
// A 4xx may be the backend's own answer (not a failure) or tunneld's (no route, access refused): amber, not red.
function classes(counts) {
  const keys = Object.keys(counts || {}).sort();
  if (!keys.length) return [el("span", "arrow", "none yet")];
  return keys.map((k) => pill(k + " " + counts[k], !failed(k) ? "ok" : (k === "4xx" ? "warn" : "bad")));
}
// Failures by who made them (older servers send only "errors").
function failureTiles(t) {
  if (t.errors_tunneld === undefined) return [tile(t.errors, "failed", t.errors ? "bad" : "")];
  return [tile(t.errors_tunneld, "failed by tunneld", t.errors_tunneld ? "bad" : ""),
    tile(t.errors_backend, "backend 5xx", t.errors_backend ? "bad" : ""),
    tile(t.backend_4xx, "backend 4xx (not failures)")];
}
function table(headers, rows, empty) {
  if (!rows.length) return el("div", "empty", empty);
  const head = el("tr", null, headers.map((h) => el("th", h.endsWith("#") ? "num" : null, h.replace(/#$/, ""))));
  return el("table", null, el("thead", null, head), el("tbody", null, rows));
}
function td(v, cls) { return el("td", cls, v); }
function tile(n, label, kind) { return el("div", "tile" + (kind ? " " + kind : ""), el("div", "n", n), el("div", "l", label)); }
function section(title, note, body) { return el("section", null, el("h2", null, title, note ? el("small", null, note) : null), body); }

function refusals(r) {
  const counts = r.refusals || {};
  const keys = Object.keys(counts).sort();
  const guard = r.access ? [el("span", "mono", r.access), " "] : [el("span", "arrow", "open")];
  return guard.concat(keys.map((k) => pill(k + " " + counts[k], "bad")));
}

function failures(d) {
  const rows = d.recent_errors.map((e) => el("tr", null,
    td(stamp(e.time), "mono"), td(e.protocol), td(e.route, "mono"),
    td(pill(String(e.status), "bad")), td(e.reason || "-"),
    td(e.answered_by === "backend" ? "backend" : (e.answered_by ? "tunneld" : "-")), td(e.served_by || "-", "mono"),
    td(e.path || "", "mono"), td(ms(e.duration), "num"), td(e.request_id || "-", "mono"), td(e.trace_id, "mono")));
  return section("Recent failures", "last " + d.recent_errors.length + ", newest first; tunneld's own error answers " +
      "and backend 5xx (a backend's 4xx is its answer, not a failure)",
    table(["time", "protocol", "route", "status", "reason", "by", "served by", "path", "duration#", "request_id",
           "trace_id"], rows, "No failed requests."));
}

function renderServer(d) {
  $("title").textContent = "tunneld server";
  $("meta").textContent = "v" + d.version + " \u00b7 config " + d.config.version + " \u00b7 up " + dur(d.now - d.started) +
    (d.draining ? " \u00b7 DRAINING" : "");
  const t = d.totals;
  const tiles = [tile(t.clients, "clients", t.clients ? "good" : "bad"), tile(t.streams, "streams"),
    tile(t.in_flight, "in flight"), tile(t.requests, "requests"), ...failureTiles(t),
    tile(d.counters.messages_dropped, "dropped msgs", d.counters.messages_dropped ? "bad" : ""),
    tile(d.counters.flow_stalls, "flow stalls"),
    tile(d.counters.access_refusals || 0, "access refused", d.counters.access_refusals ? "bad" : "")];
  // Tunnel port: opens accepted and refused (SPEC 8.2); the refusals by result in the tile's title.
  const o = d.tunnel_opens || {};
  const refusedOpens = (o.unauthenticated || 0) + (o.malformed || 0) + (o.rate_limited || 0) + (o.throttled || 0);
  tiles.push(tile(o.accepted || 0, "tunnel opens"));
  const opensTile = tile(refusedOpens, "opens refused", refusedOpens ? "bad" : "");
  opensTile.title = "unauthenticated " + (o.unauthenticated || 0) + ", malformed " + (o.malformed || 0) +
    ", rate_limited " + (o.rate_limited || 0) + ", throttled " + (o.throttled || 0);
  opensTile.id = "tunnel-opens";
  tiles.push(opensTile);
  const clients = d.clients.map((c) => el("tr", null,
    td(el("b", null, c.client_id)), td(c.group), td(c.address, "mono"), td(c.version),
    td(dur(d.now - c.connected_at), "num"), td(dur(d.now - c.last_heartbeat) + " ago", "num"), td(ms(c.rtt), "num"),
    td(c.in_flight, "num"), td(pill(!c.healthy ? "silent" : c.stalled ? "stalled" : "healthy", c.healthy && !c.stalled ? "ok" : "bad"))));
  const routes = d.routes.map((r) => el("tr", null,
    td(el("b", null, r.name)), td(r.match, "mono"),
    td(r.kind === "forward" ? el("span", "arrow", "forward") : [el("span", "arrow", "\u2192 "), r.group]),
    td(r.kind === "forward" ? "" : (r.clients.length ? r.clients.map((c) => pill(c, "ok"))
                                                        : pill("no client", "bad"))),
    td(r.backend, "mono"), td(classes(r.requests)), td(refusals(r))));
  if (Object.keys(d.unrouted || {}).length) {
    routes.push(el("tr", null, td(el("i", null, "no route")), td("-"), td(""), td(""), td(""), td(classes(d.unrouted)),
      td("")));
  }
  const groups = d.groups.map((g) => el("tr", null, td(el("b", null, g.name)), td(g.clients, "num"),
    td(g.streams, "num"), td(g.healthy === undefined ? "-" : g.healthy, "num"), td(g.in_flight, "num"),
    td(g.routes.join(", ") || "-")));
  const page = d.clients_page || {total: d.clients.length, offset: 0};
  const focused = document.activeElement === search;
  $("body").replaceChildren(
    el("div", "tiles", tiles),
    section("Groups", null, table(["group", "clients#", "streams#", "healthy#", "in flight#", "routes"], groups,
                                  "No groups.")),
    section("Connected clients", (page.total > d.clients.length ? "showing " + d.clients.length + " of " : "") +
        page.total + " streams" + (search.value ? " matching \u201c" + search.value + "\u201d" : ""),
      [el("div", "search", search),
       table(["client", "group", "address", "version", "connected#", "heartbeat#", "rtt#", "in flight#", "health"],
             clients, search.value ? "No client matches." : "No client is connected.")]),
    section("Routes", "what flows where: route \u2192 group \u2192 clients, and how it went",
      table(["route", "match", "group", "clients", "backend", "requests by status", "access / refused"], routes,
            "No routes configured.")),
    failures(d));
  if (focused) search.focus();
}

function renderClient(d) {
  $("title").textContent = "tunneld client " + d.client_id;
  $("meta").textContent = "v" + d.version + " \u00b7 group " + d.group + " \u00b7 server " + (d.servers || []).map((v) => v.address).join(", ") +
    " \u00b7 up " + dur(d.now - d.started) + (d.draining ? " \u00b7 DRAINING" : "");
  const tiles = [tile(d.connected ? "connected" : "down", "tunnel", d.connected ? "good" : "bad"),
    tile(d.connected_since ? dur(d.now - d.connected_since) : "-", "connected for"), tile(ms(d.rtt), "rtt"),
    tile(d.in_flight, "in flight"), tile(d.totals.requests, "requests"),
    ...failureTiles(d.totals), tile(d.reconnects, "reconnects")];
  const routes = d.routes.map((r) => el("tr", null, td(el("b", null, r.name)), td(r.match, "mono"),
    td([el("span", "arrow", "\u2192 "), r.backend], "mono"), td(classes(r.requests))));
  const servers = (d.servers || []).map((v) => el("tr", null, td(el("b", null, v.address), "mono"),
    td(pill(v.state, v.state === "connected" ? "ok" : (v.state === "draining" ? "warn" : "bad"))),
    td(v.connected_since ? dur(d.now - v.connected_since) : "-", "num"), td(ms(v.rtt), "num"),
    td(v.in_flight, "num"), td(v.reconnects, "num"), td(v.routes.length, "num"),
    td(v.state === "connected" ? "" : (v.diagnosis || ""))));
  $("body").replaceChildren(el("div", "tiles", tiles),
    section("Servers", "one tunnel stream to each",
      table(["server", "state", "connected#", "rtt#", "in flight#", "reconnects#", "routes#", "why not connected"], servers,
            "No servers.")),
    section("Routes", "granted by the server, config " + (d.config_version || "-"),
      table(["route", "match", "backend", "requests by status"], routes, "No routes (not connected yet?).")),
    failures(d));
}

// -- the traffic view (the inspector: GET /inspect, /inspect/<id>, POST /inspect/<id>/replay) ------

function authHeaders() { return token ? {"Authorization": "Bearer " + token} : {}; }
const filters = {protocol: "", route: "", status: ""};
let opened = null;      // request_id of the exchange shown in #detail
let lastTraffic = [];

function statusKind(e) {
  const s = e.status;
  if (!e.done) return "warn";
  if (e.protocol === "grpc") return s === "OK" ? "ok" : "bad";
  if (e.protocol === "websocket") return (s === 1000 || s === 1001 || s === 1005) ? "ok" : "bad";
  return s < 400 ? "ok" : "bad";
}
function what(e) {
  const r = e.request;
  if (e.protocol === "grpc") return "/" + r.service + "/" + r.method;
  return (e.protocol === "http" ? r.method + " " : "") + r.path;
}
function size(n) { return n < 1024 ? n + " B" : (n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB"); }
function matches(e) {
  if (filters.protocol && e.protocol !== filters.protocol) return false;
  if (filters.route && !e.route.includes(filters.route)) return false;
  if (filters.status && !String(e.status).startsWith(filters.status)) return false;
  return true;
}

function trafficControls() {
  const proto = el("select", null, ["", "http", "websocket", "grpc"].map((p) => {
    const o = el("option", null, p || "all protocols"); o.value = p; o.selected = filters.protocol === p; return o; }));
  proto.id = "f-protocol";
  proto.addEventListener("change", () => { filters.protocol = proto.value; renderTraffic(lastTraffic); });
  const input = (id, key, ph) => {
    const i = el("input"); i.id = id; i.placeholder = ph; i.value = filters[key];
    i.addEventListener("input", () => { filters[key] = i.value.trim(); renderTraffic(lastTraffic); });
    return i;
  };
  return el("div", "filters", proto, " ", input("f-route", "route", "route"), " ", input("f-status", "status", "status (e.g. 5, 200, OK)"));
}

function renderTraffic(list) {
  lastTraffic = list;
  const box = $("traffic");
  const shown = list.filter(matches);
  const rows = shown.map((e) => {
    const tr = el("tr", "click" + (e.request_id === opened ? " sel" : ""),
      td(stamp(e.started), "mono"), td(pill(e.protocol)), td(e.route, "mono"), td(e.client_id || "-", "mono"),
      td(what(e), "mono path"), td(pill(e.done ? String(e.status) : "open", statusKind(e))), td(ms(e.duration), "num"),
      td(size(e.bytes_in) + " / " + size(e.bytes_out), "num"),
      td(e.messages.length ? String(e.messages.length) : "", "num"), td(e.replay_of ? "replay" : "", "arrow"));
    tr.dataset.id = e.request_id;
    tr.addEventListener("click", () => openExchange(e.request_id));
    return tr;
  });
  let controls = $("traffic-controls");
  if (!controls) {
    controls = trafficControls();
    controls.id = "traffic-controls";
    box.replaceChildren(el("section", null, el("h2", null, "Traffic", el("small", null, "the inspector: last exchanges, newest first; click one to open it")),
      controls, el("div", null)));
  }
  box.querySelector("section > div:last-child").replaceChildren(
    table(["time", "protocol", "route", "served by", "request", "status", "duration#", "in / out#", "msgs#", ""], rows,
          list.length ? "Nothing matches the filters." : "No traffic yet."));
}

function decode(b64) {
  const bin = atob(b64 || "");
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}
function showBytes(b64, headers) {
  const bytes = decode(b64);
  if (!bytes.length) return el("div", "empty", "(no bytes captured)");
  let text = null;
  try { text = new TextDecoder("utf-8", {fatal: true}).decode(bytes); } catch (e) { text = null; }
  if (text !== null && !/[\u0000-\u0008\u000e-\u001f]/.test(text)) {
    const ctype = (headers || []).filter((h) => h[0].toLowerCase() === "content-type").map((h) => h[1]).join("");
    if (ctype.includes("json") || /^\s*[{[]/.test(text)) {
      try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not whole JSON: as text */ }
    }
    return el("pre", "body", text);
  }
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = Array.from(bytes.slice(i, i + 16));
    lines.push(i.toString(16).padStart(6, "0") + "  " + row.map((b) => b.toString(16).padStart(2, "0")).join(" ").padEnd(48) +
      "  " + row.map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join(""));
  }
  return el("pre", "body hex", lines.join("\n"));
}
function headerTable(pairs) {
  return table(["name", "value"], (pairs || []).map((p) => el("tr", null, td(p[0], "mono"), td(p[1], "mono"))), "none");
}

async function openExchange(id) {
  opened = id;
  const r = await fetch("inspect/" + encodeURIComponent(id), {cache: "no-store", headers: authHeaders()});
  const box = $("detail");
  if (!r.ok) { box.hidden = false; box.replaceChildren(el("div", "empty", "HTTP " + r.status + " for " + id)); return; }
  const e = await r.json();
  const req = e.request, resp = e.response;
  const close = el("button", null, "Close");
  close.addEventListener("click", () => { opened = null; box.hidden = true; renderTraffic(lastTraffic); });
  const title = el("h2", null, e.protocol + " " + what(e) + " ", el("small", null, "request_id " + e.request_id + " \u00b7 trace " + e.trace_id +
    (e.replay_of ? " \u00b7 replay of " + e.replay_of : "")));
  const parts = [title, el("div", "tools", close)];
  if (e.protocol === "http") {
    const replay = el("button", "primary", "Replay");
    replay.id = "replay";
    replay.disabled = !e.replayable;
    replay.title = e.replayable ? "send this request again through the same route" : "the request body was not captured whole";
    const said = el("span", "arrow");
    said.id = "replay-result";
    replay.addEventListener("click", async () => {
      const rr = await fetch("inspect/" + encodeURIComponent(e.request_id) + "/replay", {method: "POST", headers: Object.assign({"X-Tunneld-Replay": "1"}, authHeaders())});
      if (rr.ok) { const j = await rr.json(); said.textContent = " replayed as " + j.request_id; await pollTraffic(); }
      else said.textContent = " refused: HTTP " + rr.status + " " + (await rr.text());
    });
    parts[1].append(" ", replay, said);
  }
  parts.push(el("div", "tiles", tile(String(e.status), "status", statusKind(e) === "bad" ? "bad" : "good"), tile(ms(e.duration), "duration"),
    tile(size(e.bytes_in), "in"), tile(size(e.bytes_out), "out"), tile(e.route, "route"), tile(e.client_id || "-", "client")));
  parts.push(section(e.protocol === "grpc" ? "Request metadata" : "Request headers", null,
    headerTable(e.protocol === "grpc" ? req.metadata : req.headers)));
  if (e.protocol === "http") parts.push(section("Request body", req.body_complete ? "whole" : "first bytes", showBytes(req.body, req.headers)));
  parts.push(section(e.protocol === "grpc" ? "Response metadata" : "Response headers", "status " + resp.status, headerTable(resp.headers)));
  if (e.protocol === "http") parts.push(section("Response body", resp.body_complete ? "whole" : "first bytes", showBytes(resp.body, resp.headers)));
  if (e.protocol === "grpc") parts.push(section("Status", e.status + (resp.details ? ": " + resp.details : ""), headerTable(resp.trailers)));
  if (e.protocol !== "http") {
    const msgs = e.messages.map((m) => el("div", "msg " + m.direction,
      el("div", "meta", (m.direction === "in" ? "\u2192 to backend" : "\u2190 to caller") + " \u00b7 +" + ms(m.time) + " \u00b7 " + size(m.size) +
        (m.opcode === 2 ? " \u00b7 binary" : "")), showBytes(m.data)));
    parts.push(section("Messages", e.messages.length + (e.messages_dropped ? " (+" + e.messages_dropped + " not kept)" : ""),
      msgs.length ? el("div", "timeline", msgs) : el("div", "empty", "No messages.")));
  }
  box.hidden = false;
  box.replaceChildren(...parts);
  renderTraffic(lastTraffic);
}

async function pollTraffic() {
  const r = await fetch("inspect", {cache: "no-store", headers: authHeaders()});
  if (r.status === 404) { $("traffic").replaceChildren(); return; }   // the inspector is off
  if (!r.ok) return;
  const d = await r.json();
  renderTraffic(d.exchanges);
  return d.exchanges;
}

// -- live charts per route: request rate and failures (from /status counts), latency (from the inspector) --

const HISTORY = 90;           // samples kept: 3 minutes at one poll every 2 s
const series = {};            // route -> [{rate, errors, latency}]
let previous = null;          // {time, counts: route -> {total, failed}}

function routeCounts(d) {
  const counts = {};
  for (const r of d.routes || []) {
    let total = 0, bad = 0;
    for (const [k, n] of Object.entries(r.requests || {})) { total += n; if (failed(k)) bad += n; }
    counts[r.name] = {total: total, failed: r.failed === undefined ? bad : r.failed};
  }
  return counts;
}
function spark(values, kind) {
  const NS = "http://www.w3.org/2000/svg", w = 180, h = 34;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("class", "spark " + kind);
  const max = Math.max(...values, 1e-9);
  const pts = values.map((v, i) => ((values.length === 1 ? w : i * w / (values.length - 1))).toFixed(1) + "," +
    (h - 2 - (v / max) * (h - 4)).toFixed(1)).join(" ");
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", pts); line.setAttribute("fill", "none"); line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  return svg;
}
function updateCharts(d, exchanges) {
  const now = Date.now() / 1000;
  const counts = routeCounts(d);
  if (previous !== null && now > previous.time) {
    const dt = now - previous.time;
    for (const [route, c] of Object.entries(counts)) {
      const before = previous.counts[route] || {total: c.total, failed: c.failed};
      const recent = (exchanges || []).filter((e) => e.route === route && e.done && e.started + e.duration >= previous.time);
      const latency = recent.length ? recent.reduce((a, e) => a + e.duration, 0) / recent.length : 0;
      const s = series[route] || (series[route] = []);
      s.push({rate: Math.max(0, c.total - before.total) / dt, errors: Math.max(0, c.failed - before.failed) / dt, latency: latency});
      if (s.length > HISTORY) s.shift();
    }
  }
  previous = {time: now, counts: counts};
  const rows = Object.keys(series).sort().map((route) => {
    const s = series[route], last = s[s.length - 1];
    return el("tr", null, td(el("b", null, route)),
      td([spark(s.map((p) => p.rate), "rate"), " ", last.rate.toFixed(1) + " req/s"], "chart"),
      td([spark(s.map((p) => p.errors), "errors"), " ", last.errors.toFixed(1) + " failed/s"], "chart"),
      td([spark(s.map((p) => p.latency), "latency"), " ", ms(last.latency)], "chart"));
  });
  const quiet = !(d.totals && d.totals.requests);
  $("charts").replaceChildren(section("Per route, last minutes", "request rate, failures and mean latency, one point per poll",
    [quiet ? el("div", "empty", howToMakeTraffic(d)) : null,
     table(["route", "requests", "failures", "latency"], rows, "Collecting (two polls needed)...")]));
}
// An empty chart says how to fill it.
function howToMakeTraffic(d) {
  if (d.role === "client") {
    return "No traffic yet. Requests reach this client through its server's entry (or its own http_entry" +
      (d.http_entry ? " at http://" + d.http_entry + "/" : "") + "); the charts draw from the second poll on.";
  }
  const http = d.listen && d.listen.http;
  return "No traffic yet. Send a request to the HTTP entry" + (http ? " at http://" + http + "/" : "") +
    " with a route's host and path (the Routes table lists them), e.g. curl -H 'Host: <route host>' " +
    (http ? "http://" + http : "http://<http_listen>") + "/<path>; `make demo` prints ready-made commands." +
    " The charts draw from the second poll on.";
}

// The client list is one page of /status: at most CLIENT_ROWS rows, filtered by the search box
// (a substring of client id or address), so 10,000 clients never become 10,000 rows.
const CLIENT_ROWS = 50;
const search = el("input", "mono");
search.type = "search";
search.id = "clientsearch";
search.placeholder = "search client id or address";
search.addEventListener("input", () => poll());

let timer = null;
async function poll() {
  clearTimeout(timer);
  try {
    const r = await fetch("status?limit=" + CLIENT_ROWS + (search.value ? "&q=" + encodeURIComponent(search.value) : ""),
                          {cache: "no-store", headers: token ? {"Authorization": "Bearer " + token} : {}});
    if (r.status === 401) {
      $("auth").className = "show";
      $("live").replaceChildren(el("span", "dot off"), "token needed");
    } else if (!r.ok) {
      throw new Error("HTTP " + r.status);
    } else {
      const d = await r.json();
      $("auth").className = "";
      if (d.role === "client") renderClient(d); else renderServer(d);
      const exchanges = await pollTraffic();
      updateCharts(d, exchanges);
      $("live").replaceChildren(el("span", "dot on"), "live \u00b7 " + new Date().toLocaleTimeString());
    }
  } catch (e) {
    $("live").replaceChildren(el("span", "dot off"), "unreachable (" + e.message + ")");
  }
  timer = setTimeout(poll, 2000);
}
$("authform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value;
  history.replaceState(null, "", "#token=" + encodeURIComponent(token));
  poll();
});
poll();
