// meshscale dashboard: vanilla JS, no build step, no network access beyond this node.
//
// Data: GET api/v1/stream (server-sent events read through fetch(), because EventSource
// cannot send the Authorization header), falling back to polling api/v1/snapshot once a
// second when streaming fails. Every render is a pure function of the latest snapshot
// plus a little smoothing state (map positions, PCA axes, the event log).
(function () {
  "use strict";

  const API = "api/v1/";
  const TOKEN_KEY = "meshscale.token";
  const STALE_AFTER_MS = 3500;
  const MAX_EVENTS = 200;
  const MAX_OBJECT_ROWS = 300;
  // The node keeps its last hour of one-second points; the page loads them once on open
  // (and after the node restarts) and adds each snapshot's newest.
  const HISTORY_POINTS = 3600;
  const TIMELINE_MIN_S = 30;
  const TIMELINE_MAX_S = 600;
  const TIMELINE_SUBROWS = 4;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAP_W = 800;
  const MAP_H = 560;
  const MAP_PAD = 46;
  const STATE_ORDER = { dead: 0, suspect: 1, alive: 2, left: 3, removed: 4 };
  const CERT_WARNING_DAYS = 30;
  // Distinct from the state colours (green / amber / red / grey) so region and state never
  // read as each other.
  const REGION_PALETTE = [
    "#3b6fd4", "#8e5cc7", "#1b9e9a", "#d0589f", "#8c6b4f", "#6a8a1f",
    "#2f4b7c", "#3fa7d6", "#b86bd6", "#5a7d9a", "#c47a3a", "#467a5c",
  ];

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const svg = (tag, attrs) => {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    return e;
  };
  const byName = (a, b) => String(a).localeCompare(String(b), undefined, { numeric: true });

  const ui = {
    snap: null,
    lastUpdate: 0,
    viewedKey: "",
    events: new Map(),
    sort: { key: "state", dir: 1 },
    filter: "",
    regionColors: new Map(),
    layout: "region",
    pcaAxes: null,
    mapScale: null,
    highlighted: "",
    connStatus: "connecting",
    counterHist: new Map(), // "op:NAME" / "x:LABEL" -> [[ms, value], ...] for rates
    history: [], // this node's one-second points, oldest first (from the node)
    historyLoaded: -1, // points the last history load brought (-1: not loaded yet)
  };

  // ---------------------------------------------------------------- token

  // The token lives in this tab's session only (sessionStorage): never in localStorage,
  // where it would outlive the tab on disk. An entry an older page left there is removed.
  function storeToken(t) {
    try {
      sessionStorage.setItem(TOKEN_KEY, t);
      localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage disabled: keep it in memory only */ }
  }

  function forgetToken() {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
      localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* ignore */ }
  }

  function initialToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (m) {
      const t = decodeURIComponent(m[1]);
      storeToken(t);
      // Keep the token out of the address bar, history and screenshots.
      history.replaceState(null, "", location.pathname + location.search);
      return t;
    }
    try {
      localStorage.removeItem(TOKEN_KEY);
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  let token = initialToken();

  function showTokenForm(message) {
    $("token-form").hidden = false;
    $("token-error").textContent = message || "";
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (!t) return;
    token = t;
    storeToken(t);
    $("token-input").value = "";
    $("token-form").hidden = true;
    startConnection();
  });

  $("forget-token").addEventListener("click", () => {
    forgetToken();
    token = "";
    stopConnection();
    setStatus("unauthorized", "token needed");
    showTokenForm();
  });

  // ---------------------------------------------------------------- connection

  let generation = 0; // bumps on every (re)start; stale loops notice and exit
  let abortCtl = null;
  let streamFailures = 0;
  let retryTimer = null;

  function setStatus(status, text) {
    ui.connStatus = status;
    const s = $("conn-status");
    s.dataset.status = status;
    s.textContent = text || status;
  }

  function stopConnection() {
    generation += 1;
    if (abortCtl) abortCtl.abort();
    abortCtl = null;
    if (retryTimer) clearTimeout(retryTimer);
    retryTimer = null;
  }

  function startConnection() {
    stopConnection();
    if (!token) {
      setStatus("unauthorized", "token needed");
      showTokenForm();
      return;
    }
    streamFailures = 0;
    runStream(generation);
  }

  function later(gen, ms, fn) {
    if (retryTimer) clearTimeout(retryTimer);
    retryTimer = setTimeout(() => {
      retryTimer = null;
      if (gen === generation) fn();
    }, ms);
  }

  function unauthorized() {
    stopConnection();
    setStatus("unauthorized", "token rejected");
    showTokenForm("The node answered 401: that token is not accepted here.");
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: "Bearer " + token }, extra || {});
  }

  async function runStream(gen) {
    abortCtl = new AbortController();
    setStatus(streamFailures ? "reconnecting" : "connecting", streamFailures ? "reconnecting" : "connecting");
    let resp;
    try {
      resp = await fetch(API + "stream", {
        headers: authHeaders({ Accept: "text/event-stream" }),
        signal: abortCtl.signal,
        cache: "no-store",
      });
    } catch (e) {
      return streamFailed(gen);
    }
    if (gen !== generation) return;
    if (resp.status === 401 || resp.status === 403) return unauthorized();
    if (!resp.ok || !resp.body) return streamFailed(gen, true);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (gen !== generation) return;
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          if (handleSseBlock(block)) {
            streamFailures = 0;
            setStatus("live", "live");
          }
        }
        if (buf.length > 8 * 1024 * 1024) throw new Error("event larger than 8 MiB");
      }
    } catch (e) {
      if (gen !== generation) return;
    }
    streamFailed(gen);
  }

  function handleSseBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line[0] === ":") continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length || (event !== "snapshot" && event !== "message")) return false;
    try {
      applySnapshot(JSON.parse(data.join("\n")));
      return true;
    } catch (e) {
      console.warn("meshscale: bad snapshot event", e);
      return false;
    }
  }

  function streamFailed(gen, hard) {
    if (gen !== generation) return;
    streamFailures += 1;
    if (hard || streamFailures >= 3) {
      // Streaming does not work here (a proxy buffering it, an old node): poll instead,
      // and try the stream again now and then.
      setStatus("polling", "polling");
      runPoll(gen, Date.now() + 30000);
      return;
    }
    const backoff = Math.min(8000, 500 * Math.pow(2, streamFailures - 1));
    setStatus("reconnecting", "reconnecting");
    later(gen, backoff, () => runStream(gen));
  }

  async function runPoll(gen, retryStreamAt) {
    if (gen !== generation) return;
    if (Date.now() > retryStreamAt) {
      streamFailures = 0;
      runStream(gen);
      return;
    }
    let ok = false;
    try {
      abortCtl = new AbortController();
      const resp = await fetch(API + "snapshot", {
        headers: authHeaders(), signal: abortCtl.signal, cache: "no-store",
      });
      if (gen !== generation) return;
      if (resp.status === 401 || resp.status === 403) return unauthorized();
      if (resp.ok) {
        applySnapshot(await resp.json());
        ok = true;
        setStatus("polling", "polling");
      }
    } catch (e) {
      if (gen !== generation) return;
    }
    later(gen, ok ? 1000 : 2000, () => runPoll(gen, retryStreamAt));
  }

  setInterval(() => {
    if (!ui.lastUpdate) return;
    const age = Date.now() - ui.lastUpdate;
    $("last-update").textContent = "updated " + fmtAge(age / 1000) + " ago";
    if (age > STALE_AFTER_MS && (ui.connStatus === "live" || ui.connStatus === "polling")) {
      setStatus("stale", "stale");
    }
    if (age > STALE_AFTER_MS && ui.snap) {
      // Say so loudly: everything below is this node's last view, not the mesh now.
      const name = (ui.snap.node || {}).name || "this node";
      const health = $("health");
      health.dataset.level = "bad";
      health.textContent = `No update from ${name} for ${fmtAge(age / 1000)}: it may be down or unreachable `
        + "(every node serves this dashboard: open another one). Below is its last view.";
    }
  }, 1000);

  // ---------------------------------------------------------------- snapshot

  function applySnapshot(snap) {
    if (!snap || typeof snap !== "object") return;
    const node = snap.node || {};
    const members = Array.isArray(snap.members) ? snap.members.slice() : [];
    if (node.name && !members.some((m) => m.name === node.name)) {
      members.unshift({
        name: node.name, address: node.address, http: node.http, region: node.region,
        zone: node.zone, state: "alive", incarnation: node.incarnation, rtt_ms: 0,
        coord: null, load: null, labels: {},
      });
    }
    snap.members = members;
    // A restarted node numbers its events from scratch: start the log over.
    const key = (node.name || "") + "/" + (node.incarnation || 0);
    if (key !== ui.viewedKey) {
      ui.viewedKey = key;
      ui.events.clear();
      ui.history = [];
      ui.historyLoaded = -1;
      loadHistory(key);
    }
    mergePoints(snap.throughput);
    for (const ev of snap.events || []) ui.events.set(ev.seq, ev);
    if (ui.events.size > MAX_EVENTS) {
      const keep = [...ui.events.keys()].sort((a, b) => b - a).slice(0, MAX_EVENTS);
      const kept = new Map(keep.map((k) => [k, ui.events.get(k)]));
      ui.events = kept;
    }
    ui.snap = snap;
    ui.lastUpdate = Date.now();
    $("last-update").textContent = "updated just now";
    if (ui.connStatus === "stale") setStatus("live", "live");
    render();
  }

  // The node's whole ring (the last hour): what a reload shows at once.
  async function loadHistory(key) {
    try {
      const resp = await fetch(API + "throughput", { headers: authHeaders(), cache: "no-store" });
      if (resp.status === 401 || resp.status === 403) return unauthorized();
      if (!resp.ok || key !== ui.viewedKey) return;
      const body = await resp.json();
      if (key !== ui.viewedKey) return;
      const pts = Array.isArray(body.points) ? body.points : [];
      mergePoints(pts);
      ui.historyLoaded = pts.length;
      if (ui.snap) renderCharts(ui.snap);
    } catch (e) {
      console.warn("meshscale: could not load the throughput history", e);
    }
  }

  function mergePoints(pts) {
    if (!Array.isArray(pts) || !pts.length) return;
    const byT = new Map(ui.history.map((p) => [p.t, p]));
    for (const p of pts) if (p && typeof p.t === "number") byT.set(p.t, p);
    ui.history = [...byT.values()].sort((a, b) => a.t - b.t).slice(-HISTORY_POINTS);
  }

  // The object listing is a mesh-wide fan-out the node caches for a few seconds; the
  // membership is fresher, so a replica on a node now dead counts as missing at once.
  function markUnderReplicated(snap) {
    const states = new Map(snap.members.map((m) => [m.name, m.state]));
    for (const o of snap.objects || []) {
      const down = (o.replicas || []).some((n) => ["dead", "left", "removed"].includes(states.get(n)));
      o.under_replicated = Boolean(o.under_replicated) || down;
    }
  }

  function render() {
    const snap = ui.snap;
    markUnderReplicated(snap);
    assignRegionColors(snap.members);
    renderHeader(snap);
    for (const e of document.querySelectorAll(".viewed-name")) e.textContent = (snap.node || {}).name || "this node";
    renderMap(snap);
    renderMembers(snap);
    renderLoad(snap);
    renderCharts(snap);
    renderObjects(snap);
    renderResources(snap);
    renderTimeline(snap);
    renderTasks(snap);
    renderStreams(snap);
    renderServices(snap);
    renderEvents();
  }

  function assignRegionColors(members) {
    const regions = [...new Set(members.map((m) => m.region || "?"))].sort(byName);
    for (const r of regions) {
      if (!ui.regionColors.has(r)) {
        const i = ui.regionColors.size;
        ui.regionColors.set(r, i < REGION_PALETTE.length
          ? REGION_PALETTE[i]
          : `hsl(${(i * 137.5) % 360}deg 45% 45%)`);
      }
    }
  }

  const regionColor = (r) => ui.regionColors.get(r || "?") || "#6b7a8e";

  // ---------------------------------------------------------------- header

  function counts(members) {
    const c = { alive: 0, suspect: 0, dead: 0, left: 0 };
    for (const m of members) c[m.state] = (c[m.state] || 0) + 1;
    return c;
  }

  function renderHeader(snap) {
    const node = snap.node || {};
    const c = counts(snap.members);
    const regions = new Set(snap.members.filter((m) => m.state !== "left" && m.state !== "removed").map((m) => m.region || "?"));
    for (const k of ["alive", "suspect", "dead", "left"]) {
      $("count-" + k).textContent = c[k];
      const box = $("count-" + k).parentElement;
      box.classList.toggle("zero", c[k] === 0);
      box.classList.toggle("hot", c[k] > 0);
    }
    $("count-regions").textContent = regions.size;
    const parts = [
      "viewing from " + (node.name || "?"),
      [node.region, node.zone].filter(Boolean).join(" / "),
      node.address,
      node.uptime_s !== undefined ? "up " + fmtAge(node.uptime_s) : "",
      node.version ? "v" + node.version : "",
    ].filter(Boolean);
    $("viewed-node").textContent = parts.join("  \u00b7  ");
    $("members-total").textContent = `${snap.members.length} known`;

    const named = (state) => snap.members.filter((m) => m.state === state).map((m) => m.name).sort(byName);
    const list = (names) => names.slice(0, 6).join(", ") + (names.length > 6 ? ` and ${names.length - 6} more` : "");
    const objs = snap.objects || [];
    const under = objs.filter((o) => o.under_replicated).length;
    const health = $("health");
    const msgs = [];
    let level = "ok";
    if (c.dead) {
      level = "bad";
      msgs.push(`${c.dead} ${c.dead === 1 ? "node" : "nodes"} dead: ${list(named("dead"))}`);
    }
    if (c.suspect) {
      if (level === "ok") level = "warn";
      msgs.push(`${c.suspect} suspect: ${list(named("suspect"))}`);
    }
    if (under) {
      if (level === "ok") level = "warn";
      msgs.push(`${under} ${under === 1 ? "object" : "objects"} under-replicated`
        + (snap.objects_more ? ` of the first ${objs.length}` : ""));
    }
    if (level === "ok") {
      msgs.push(`All ${c.alive} ${c.alive === 1 ? "node" : "nodes"} alive in ${regions.size} ${regions.size === 1 ? "region" : "regions"}`);
      if (objs.length) {
        msgs.push(snap.objects_more ? `the first ${objs.length} objects fully replicated`
          : `${objs.length} objects fully replicated`);
      }
    } else {
      msgs.push(`${c.alive} alive`);
    }
    health.dataset.level = level;
    health.textContent = msgs.join("   \u00b7   ");
    document.title = `meshscale \u00b7 ${c.alive} alive` + (c.suspect ? ` \u00b7 ${c.suspect} suspect` : "") + (c.dead ? ` \u00b7 ${c.dead} dead` : "");
  }

  // ---------------------------------------------------------------- map

  // A fresh coordinate starts at error 1.5 (Serf's error_max) and drops as RTT samples
  // arrive; above this it is still mostly a guess and would only scatter the map.
  const SETTLED_ERROR = 1.0;

  function coordVec(m) {
    const c = m.coord;
    if (!c || !Array.isArray(c.vec) || c.vec.length < 2) return null;
    if (typeof c.error === "number" && c.error > SETTLED_ERROR) return null;
    for (const x of c.vec) if (typeof x !== "number" || !isFinite(x)) return null;
    return c.vec;
  }

  // Top two principal axes of the coordinate vectors (power iteration with deflation), signs
  // kept aligned with the previous frame so the map does not flip every second.
  function pca2(vecs) {
    const d = vecs[0].length;
    const n = vecs.length;
    const mean = new Array(d).fill(0);
    for (const v of vecs) for (let j = 0; j < d; j++) mean[j] += v[j] / n;
    const cov = [];
    for (let a = 0; a < d; a++) cov.push(new Array(d).fill(0));
    for (const v of vecs) {
      for (let a = 0; a < d; a++) {
        const da = v[a] - mean[a];
        for (let b = 0; b < d; b++) cov[a][b] += da * (v[b] - mean[b]);
      }
    }
    const axes = [];
    for (let k = 0; k < 2; k++) {
      let x = (ui.pcaAxes && ui.pcaAxes[k] && ui.pcaAxes[k].length === d)
        ? ui.pcaAxes[k].slice()
        : Array.from({ length: d }, (_, j) => (j === k ? 1 : 0.1));
      let lambda = 0;
      for (let it = 0; it < 60; it++) {
        const y = new Array(d).fill(0);
        for (let a = 0; a < d; a++) for (let b = 0; b < d; b++) y[a] += cov[a][b] * x[b];
        const norm = Math.hypot(...y);
        if (norm < 1e-30) break;
        lambda = norm;
        x = y.map((v) => v / norm);
      }
      if (k === 0 && lambda > 0) {
        for (let a = 0; a < d; a++) for (let b = 0; b < d; b++) cov[a][b] -= lambda * x[a] * x[b];
      }
      if (k === 1) { // orthogonalise against the first axis
        const dot = x.reduce((s, v, j) => s + v * axes[0][j], 0);
        x = x.map((v, j) => v - dot * axes[0][j]);
        const norm = Math.hypot(...x) || 1;
        x = x.map((v) => v / norm);
      }
      const prev = ui.pcaAxes && ui.pcaAxes[k];
      if (prev && prev.length === d && x.reduce((s, v, j) => s + v * prev[j], 0) < 0) {
        x = x.map((v) => -v);
      }
      axes.push(x);
    }
    ui.pcaAxes = axes;
    return vecs.map((v) => [0, 1].map((k) => v.reduce((s, x, j) => s + (x - mean[j]) * axes[k][j], 0)));
  }

  function nodeRadius(n) {
    if (n <= 12) return 15;
    if (n <= 40) return 11;
    if (n <= 100) return 8;
    return 6;
  }

  // Sunflower (phyllotaxis) disc of k points: even density at any size.
  function sunflower(k, spacing) {
    const golden = Math.PI * (3 - Math.sqrt(5));
    const pts = [];
    for (let i = 0; i < k; i++) {
      const rr = k === 1 ? 0 : spacing * Math.sqrt(i + 0.5);
      pts.push([rr * Math.cos(i * golden), rr * Math.sin(i * golden)]);
    }
    return pts;
  }

  function regionLayout(members, r) {
    const groups = new Map();
    for (const m of members) {
      const g = m.region || "?";
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(m);
    }
    const regions = [...groups.keys()].sort(byName);
    const k = regions.length;
    const nmax = Math.max(...regions.map((g) => groups.get(g).length));
    const cx = MAP_W / 2;
    const cy = MAP_H / 2;
    let spacing = r * 2.7;
    let clusterR = spacing * Math.sqrt(nmax);
    // Regions on a ring when the clusters fit around it without touching; else on a grid
    // of cells, with the clusters packed tighter if a cell is too small for them.
    const ringX = Math.max(0, MAP_W / 2 - MAP_PAD - clusterR);
    const ringY = Math.max(0, MAP_H / 2 - MAP_PAD - clusterR);
    const chord = 2 * Math.min(ringX, ringY) * Math.sin(Math.PI / Math.max(k, 2));
    const centres = [];
    if (k === 1) {
      centres.push([cx, cy]);
    } else if (chord >= 2 * clusterR + 30) {
      regions.forEach((_, i) => {
        const a = -Math.PI / 2 + (2 * Math.PI * i) / k;
        centres.push([cx + ringX * Math.cos(a), cy + ringY * Math.sin(a)]);
      });
    } else {
      const cols = Math.ceil(Math.sqrt((k * MAP_W) / MAP_H));
      const rows = Math.ceil(k / cols);
      const cw = (MAP_W - 2 * 10) / cols;
      const ch = (MAP_H - 2 * 10) / rows;
      const room = Math.min(cw, ch) / 2 - 24; // label above the halo
      if (clusterR > room) {
        spacing = Math.max(2 * r + 1, room / Math.sqrt(nmax));
        clusterR = spacing * Math.sqrt(nmax);
      }
      regions.forEach((_, i) => {
        const row = Math.floor(i / cols);
        const inRow = row === rows - 1 ? k - cols * (rows - 1) : cols;
        const col = i - row * cols;
        const x0 = (MAP_W - inRow * cw) / 2;
        centres.push([x0 + (col + 0.5) * cw, 10 + (row + 0.5) * ch + 10]);
      });
    }
    const pos = new Map();
    regions.forEach((g, i) => {
      const [gx, gy] = centres[i];
      const ms = groups.get(g).slice().sort((p, q) => byName(p.name, q.name));
      sunflower(ms.length, spacing).forEach(([dx, dy], j) => pos.set(ms[j].name, [gx + dx, gy + dy]));
    });
    return pos;
  }

  // Vivaldi coordinates are seconds; `spreadMs` is the larger side of the projected
  // bounding box. Below about a millisecond (one machine, one rack) the projection is
  // noise, so the map groups by region instead.
  function vivaldiLayout(members, r) {
    const withCoord = members.filter((m) => coordVec(m));
    if (withCoord.length < 2 || withCoord.length < members.length / 2) return null;
    const dims = coordVec(withCoord[0]).length;
    const usable = withCoord.filter((m) => coordVec(m).length === dims);
    const proj = pca2(usable.map(coordVec));
    let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
    for (const [x, y] of proj) {
      minX = Math.min(minX, x); maxX = Math.max(maxX, x);
      minY = Math.min(minY, y); maxY = Math.max(maxY, y);
    }
    const spreadMs = Math.max(maxX - minX, maxY - minY) * 1000;
    if (ui.layout === "region" ? spreadMs < 2 : spreadMs < 1) return null;
    const midX = (minX + maxX) / 2;
    const midY = (minY + maxY) / 2;
    // Labelled (small) meshes keep more margin: names and RTTs hang below the nodes.
    const pad = members.length > 30 ? MAP_PAD : MAP_PAD + 30;
    const fit = Math.min(
      (MAP_W - 2 * pad) / Math.max(maxX - minX, 1e-9),
      (MAP_H - 2 * pad) / Math.max(maxY - minY, 1e-9),
    );
    // Zoom out at once, zoom in slowly: nodes never leave the canvas, the map does not pump.
    ui.mapScale = ui.mapScale === null || fit < ui.mapScale ? fit : ui.mapScale * 0.8 + fit * 0.2;
    const pos = new Map();
    usable.forEach((m, i) => {
      pos.set(m.name, [MAP_W / 2 + (proj[i][0] - midX) * ui.mapScale, MAP_H / 2 + (proj[i][1] - midY) * ui.mapScale]);
    });
    // Members without a coordinate sit next to the centre of their region.
    const centre = new Map();
    for (const m of usable) {
      const g = m.region || "?";
      const p = pos.get(m.name);
      const c = centre.get(g) || [0, 0, 0];
      centre.set(g, [c[0] + p[0], c[1] + p[1], c[2] + 1]);
    }
    const strays = members.filter((m) => !pos.has(m.name));
    const offsets = sunflower(strays.length + 1, r * 2.7);
    strays.forEach((m, i) => {
      const c = centre.get(m.region || "?");
      const base = c ? [c[0] / c[2], c[1] / c[2]] : [MAP_W / 2, MAP_H / 2];
      pos.set(m.name, [base[0] + offsets[i + 1][0], base[1] + offsets[i + 1][1]]);
    });
    return pos;
  }

  // Push overlapping nodes apart (nodes of one site share a coordinate). A labelled node
  // is a box about 56 px wide ("node-12") and 2r + 26 px tall (its name and RTT below);
  // separation is tested in units of that box, and the walls hold on every pass.
  function relax(pos, r, labelled) {
    const names = [...pos.keys()];
    const pts = names.map((n) => pos.get(n).slice());
    const sx = labelled ? Math.max(2 * r + 3, 56) : 2 * r + 3;
    const sy = labelled ? 2 * r + 26 : 2 * r + 3;
    const clamp = (p) => {
      p[0] = Math.min(MAP_W - Math.max(r, sx / 2) - 2, Math.max(Math.max(r, sx / 2) + 2, p[0]));
      p[1] = Math.min(MAP_H - r - (labelled ? 28 : 4), Math.max(r + 4, p[1]));
    };
    pts.forEach(clamp);
    for (let it = 0; it < (labelled ? 40 : 10); it++) {
      let moved = false;
      for (let i = 0; i < pts.length; i++) {
        for (let j = i + 1; j < pts.length; j++) {
          let nx = (pts[j][0] - pts[i][0]) / sx;
          let ny = (pts[j][1] - pts[i][1]) / sy;
          let d = Math.hypot(nx, ny);
          if (d >= 1) continue;
          if (d < 1e-6) { d = 1e-6; nx = Math.cos(i + j) * d; ny = Math.sin(i + j) * d; }
          const push = (1 - d) / 2 + 0.01;
          const ux = (nx / d) * push * sx;
          const uy = (ny / d) * push * sy;
          pts[i][0] -= ux; pts[i][1] -= uy;
          pts[j][0] += ux; pts[j][1] += uy;
          clamp(pts[i]); clamp(pts[j]);
          moved = true;
        }
      }
      if (!moved) break;
    }
    names.forEach((n, i) => pos.set(n, pts[i]));
    return pos;
  }

  // Log scale from 1 ms (green) to 300 ms (red); the legend draws the same gradient.
  const RTT_STOPS = [[0, [31, 157, 85]], [0.25, [139, 195, 74]], [0.5, [230, 195, 0]], [0.75, [230, 126, 0]], [1, [214, 51, 58]]];
  function rttColor(ms) {
    const t = Math.min(1, Math.max(0, Math.log10(Math.max(ms, 1)) / Math.log10(300)));
    for (let i = 1; i < RTT_STOPS.length; i++) {
      const [t1, c1] = RTT_STOPS[i];
      const [t0, c0] = RTT_STOPS[i - 1];
      if (t <= t1) {
        const f = (t - t0) / (t1 - t0);
        const c = c0.map((v, k) => Math.round(v + (c1[k] - v) * f));
        return `rgb(${c[0]},${c[1]},${c[2]})`;
      }
    }
    return "rgb(214,51,58)";
  }

  function renderMap(snap) {
    const members = snap.members;
    const self = (snap.node || {}).name;
    const r = nodeRadius(members.length);
    let pos = vivaldiLayout(members, r);
    if (pos) {
      ui.layout = "vivaldi";
      $("map-mode").textContent = "placed by Vivaldi coordinates (2-D PCA projection; distance \u2248 network latency)";
    } else {
      ui.layout = "region";
      ui.mapScale = null;
      pos = regionLayout(members, r);
      $("map-mode").textContent = "grouped by region (Vivaldi coordinates still settling, or all nodes within a millisecond)";
    }
    const dense = members.length > 30;
    pos = relax(pos, r, !dense);
    $("map").classList.toggle("dense", dense);

    // region halos
    const gRegions = $("map-regions");
    gRegions.replaceChildren();
    const gLabels = $("map-labels");
    gLabels.replaceChildren();
    const centroids = new Map();
    const byRegion = new Map();
    for (const m of members) {
      if (m.state === "left" || m.state === "removed") continue;
      const g = m.region || "?";
      if (!byRegion.has(g)) byRegion.set(g, []);
      byRegion.get(g).push(pos.get(m.name));
    }
    for (const [g, pts] of [...byRegion.entries()].sort((a, b) => byName(a[0], b[0]))) {
      const cx = pts.reduce((s, p) => s + p[0], 0) / pts.length;
      const cy = pts.reduce((s, p) => s + p[1], 0) / pts.length;
      const rad = Math.max(...pts.map((p) => Math.hypot(p[0] - cx, p[1] - cy))) + r + 14;
      centroids.set(g, [cx, cy]);
      const color = regionColor(g);
      gRegions.append(svg("circle", { cx, cy, r: rad, class: "region-halo", fill: color, stroke: color }));
      const label = svg("text", {
        x: cx, y: Math.max(14, cy - rad - 6), "text-anchor": "middle", class: "region-label", fill: color,
      });
      label.textContent = `${g} (${pts.length})`;
      gLabels.append(label);
    }

    // links from this node to every other member, coloured by RTT
    const gLinks = $("map-links");
    gLinks.replaceChildren();
    const sp = pos.get(self);
    const selfRegion = ((members.find((m) => m.name === self) || {}).region) || "?";
    if (sp && dense) {
      // 200 lines would hide the map: one link per region, at its median RTT.
      for (const [g, c] of centroids) {
        const rtts = members
          .filter((m) => (m.region || "?") === g && m.name !== self && m.state === "alive" && typeof m.rtt_ms === "number")
          .map((m) => m.rtt_ms).sort((a, b) => a - b);
        if (!rtts.length) continue;
        const med = rtts[Math.floor(rtts.length / 2)];
        if (g === selfRegion) continue; // short hops inside the region: the table has them
        {
          gLinks.append(svg("line", {
            x1: sp[0], y1: sp[1], x2: c[0], y2: c[1], class: "link region-link", stroke: rttColor(med),
            "data-link": "region:" + g,
          }));
        }
        const lx = sp[0] + (c[0] - sp[0]) * 0.55;
        const ly = sp[1] + (c[1] - sp[1]) * 0.55;
        const t = svg("text", { x: lx, y: ly, "text-anchor": "middle", class: "link-label" });
        t.textContent = "~" + fmtMs(med);
        gLabels.append(t);
      }
    } else if (sp) {
      for (const m of members) {
        if (m.name === self || m.state === "left" || m.state === "removed") continue;
        const p = pos.get(m.name);
        const hasRtt = typeof m.rtt_ms === "number" && isFinite(m.rtt_ms);
        const line = svg("line", {
          x1: sp[0], y1: sp[1], x2: p[0], y2: p[1],
          class: "link" + (m.state === "dead" || !hasRtt ? " to-dead" : ""),
          stroke: hasRtt ? rttColor(m.rtt_ms) : "#b9c0c9",
          "data-link": m.name,
        });
        gLinks.append(line);
      }
    }

    // nodes: keyed, so CSS can animate their moves
    const gNodes = $("map-nodes");
    const existing = new Map([...gNodes.children].map((g) => [g.dataset.node, g]));
    // Draw order: alive under suspect under dead, and this node on top of all.
    const rank = (m) => (m.name === self ? -1 : STATE_ORDER[m.state] ?? 9);
    const order = members.slice().sort((a, b) => rank(b) - rank(a));
    for (const m of order) {
      let g = existing.get(m.name);
      if (!g) {
        g = svg("g", { class: "node" });
        g.dataset.node = m.name;
        g.append(
          svg("circle", { class: "ring" }),
          svg("circle", { class: "self-ring" }),
          svg("circle", { class: "body" }),
          svg("path", { class: "cross" }),
          svg("text", { class: "name" }),
          svg("text", { class: "rtt" }),
        );
        g.addEventListener("mouseenter", (ev) => showTip(ev, g.dataset.node));
        g.addEventListener("mousemove", moveTip);
        g.addEventListener("mouseleave", hideTip);
        g.addEventListener("click", () => focusMember(g.dataset.node));
        const p0 = pos.get(m.name);
        g.style.transform = `translate(${p0[0]}px, ${p0[1]}px)`;
      }
      existing.delete(m.name);
      const [x, y] = pos.get(m.name);
      g.style.transform = `translate(${x.toFixed(1)}px, ${y.toFixed(1)}px)`;
      g.dataset.state = m.state;
      g.dataset.power = m.power || "";
      g.classList.toggle("self", m.name === self);
      g.classList.toggle("highlight", m.name === ui.highlighted);
      const [ring, selfRing, body, cross, name, rtt] = g.children;
      ring.setAttribute("r", r + 4);
      selfRing.setAttribute("r", m.name === self ? r + 3 : 0);
      body.setAttribute("r", r);
      body.setAttribute("fill", regionColor(m.region));
      const k = r * 0.55;
      cross.setAttribute("d", `M${-k} ${-k}L${k} ${k}M${k} ${-k}L${-k} ${k}`);
      name.setAttribute("y", r + 13);
      name.textContent = m.name;
      const asleep = ["draining", "standby", "waking"].includes(m.power);
      rtt.setAttribute("y", r + 25);
      rtt.textContent = members.length <= 12 && m.name !== self && !["dead", "left", "removed"].includes(m.state)
        && typeof m.rtt_ms === "number" ? fmtMs(m.rtt_ms) : "";
      if (asleep) rtt.textContent = m.power;
      gNodes.append(g);
    }
    for (const g of existing.values()) g.remove();

    // legend: regions with counts
    const lr = $("legend-regions");
    lr.replaceChildren();
    const regionCounts = new Map();
    for (const m of members) {
      const g = m.region || "?";
      const c = regionCounts.get(g) || { n: 0, alive: 0 };
      c.n += 1;
      if (m.state === "alive") c.alive += 1;
      regionCounts.set(g, c);
    }
    for (const [g, c] of [...regionCounts.entries()].sort((a, b) => byName(a[0], b[0]))) {
      const span = el("span", "legend-region");
      const sw = el("span", "region-swatch");
      sw.style.background = regionColor(g);
      span.append(sw, document.createTextNode(`${g}  ${c.alive}/${c.n} alive`));
      span.dataset.region = g;
      lr.append(span);
    }
  }

  // ---------------------------------------------------------------- tooltip

  function memberByName(name) {
    return ui.snap ? ui.snap.members.find((m) => m.name === name) : null;
  }

  function showTip(ev, name) {
    const m = memberByName(name);
    if (!m) return;
    const tip = $("tooltip");
    tip.replaceChildren();
    const line = (label, value) => {
      const d = el("div");
      d.append(el("span", "sub", label + " "), document.createTextNode(value));
      tip.append(d);
    };
    tip.append(el("b", null, m.name));
    line("state", m.state);
    line("region", [m.region, m.zone].filter(Boolean).join(" / "));
    line("address", m.address || "?");
    if (m.http) line("http", m.http);
    line("RTT from here", typeof m.rtt_ms === "number" ? fmtMs(m.rtt_ms) : "unknown");
    if (m.load) line("load", `${m.load.running}/${m.load.slots} running, ${m.load.queued} queued, ${m.load.free_cpus} CPUs free`);
    if (m.coord) line("coordinate error", Number(m.coord.error).toFixed(2));
    line("incarnation", m.incarnation);
    const labels = Object.entries(m.labels || {});
    if (labels.length) line("labels", labels.map(([k, v]) => `${k}=${v}`).join(", "));
    tip.hidden = false;
    moveTip(ev);
  }

  function moveTip(ev) {
    const tip = $("tooltip");
    tip.style.left = Math.min(window.innerWidth - tip.offsetWidth - 8, ev.clientX + 14) + "px";
    tip.style.top = Math.min(window.innerHeight - tip.offsetHeight - 8, ev.clientY + 14) + "px";
  }

  function hideTip() {
    $("tooltip").hidden = true;
  }

  function focusMember(name) {
    ui.highlighted = ui.highlighted === name ? "" : name;
    for (const tr of $("members-body").children) tr.classList.toggle("highlight", tr.dataset.node === ui.highlighted);
    for (const g of $("map-nodes").children) g.classList.toggle("highlight", g.dataset.node === ui.highlighted);
    const row = $("members-body").querySelector(`tr[data-node="${CSS.escape(name)}"]`);
    if (row && ui.highlighted) row.scrollIntoView({ block: "nearest" });
  }

  // ---------------------------------------------------------------- members table

  const SORT_KEYS = {
    state: (m) => [STATE_ORDER[m.state] ?? 9],
    name: () => [],
    region: (m) => [m.region || "", m.zone || ""],
    rtt: (m) => [typeof m.rtt_ms === "number" ? m.rtt_ms : Infinity],
    load: (m) => [m.load && m.load.slots ? -(m.load.running + m.load.queued) / m.load.slots : 1],
    incarnation: (m) => [m.incarnation || 0],
    address: (m) => [m.address || ""],
  };

  function compareMembers(a, b) {
    const ka = SORT_KEYS[ui.sort.key](a);
    const kb = SORT_KEYS[ui.sort.key](b);
    for (let i = 0; i < ka.length; i++) {
      const c = typeof ka[i] === "number" ? ka[i] - kb[i] : byName(ka[i], kb[i]);
      if (c) return c * ui.sort.dir;
    }
    return byName(a.name, b.name) * (ui.sort.key === "name" ? ui.sort.dir : 1);
  }

  for (const th of document.querySelectorAll("#members th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      ui.sort = { key, dir: ui.sort.key === key ? -ui.sort.dir : 1 };
      for (const o of document.querySelectorAll("#members th[data-sort]")) {
        o.classList.toggle("sorted", o === th);
        o.dataset.dir = o === th ? String(ui.sort.dir) : "";
      }
      if (ui.snap) renderMembers(ui.snap);
    });
  }

  $("members-filter").addEventListener("input", (ev) => {
    ui.filter = ev.target.value.trim().toLowerCase();
    if (ui.snap) renderMembers(ui.snap);
  });

  function loadBar(load, width) {
    const wrap = el("span");
    const bar = el("span", "bar");
    if (width) bar.style.width = width + "px";
    const fill = el("span");
    const slots = load && load.slots ? load.slots : 0;
    const frac = slots ? Math.min(1, load.running / slots) : 0;
    fill.style.width = (frac * 100).toFixed(0) + "%";
    bar.classList.toggle("hot", frac >= 0.9 || (load && load.queued > 0));
    bar.append(fill);
    wrap.append(bar);
    const txt = el("span", "load-txt", load ? `${load.running}/${load.slots}` : "\u2013");
    wrap.append(txt);
    if (load && load.queued) {
      const q = el("span", "load-txt queued", `+${load.queued}q`);
      q.title = `${load.queued} queued`;
      wrap.append(q);
    }
    return wrap;
  }

  function renderMembers(snap) {
    const self = (snap.node || {}).name;
    const body = $("members-body");
    const existing = new Map([...body.children].map((tr) => [tr.dataset.node, tr]));
    const f = ui.filter;
    const rows = snap.members
      .filter((m) => !f || [m.name, m.region, m.zone, m.state, m.address].some((s) => String(s || "").toLowerCase().includes(f)))
      .sort(compareMembers);
    const frag = document.createDocumentFragment();
    for (const m of rows) {
      let tr = existing.get(m.name);
      existing.delete(m.name);
      if (!tr) {
        tr = el("tr");
        tr.dataset.node = m.name;
        for (let i = 0; i < 6; i++) tr.append(el("td"));
        tr.children[3].className = "num";
        tr.children[5].className = "num";
        tr.addEventListener("mouseenter", () => {
          const g = $("map-nodes").querySelector(`g[data-node="${CSS.escape(tr.dataset.node)}"]`);
          if (g) g.classList.add("highlight");
        });
        tr.addEventListener("mouseleave", () => {
          const g = $("map-nodes").querySelector(`g[data-node="${CSS.escape(tr.dataset.node)}"]`);
          if (g && g.dataset.node !== ui.highlighted) g.classList.remove("highlight");
        });
      }
      tr.dataset.state = m.state;
      tr.classList.toggle("self", m.name === self);
      tr.classList.toggle("highlight", m.name === ui.highlighted);
      const td = tr.children;
      td[0].replaceChildren(el("span", `state-pill state-${m.state}`, m.state));
      td[1].textContent = m.name;
      const certDays = typeof m.cert_expires === "number" ? (m.cert_expires - Date.now() / 1000) / 86400 : null;
      if (certDays !== null && certDays <= CERT_WARNING_DAYS && (m.state === "alive" || m.state === "suspect")) {
        const warn = el("span", "cert-warning", certDays <= 0 ? "cert ended" : `cert ${Math.floor(certDays)}d`);
        warn.title = "this node's certificate " + (certDays <= 0 ? "has ended" : `ends in ${Math.floor(certDays)} days`) + ": meshscale bundle node --renew";
        td[1].append(" ", warn);
      }
      const dot = el("span", "region-dot");
      dot.style.background = regionColor(m.region);
      // LocalMesh and most clouds name zones after their region: "eu-west-z1" says both.
      const where = m.zone && String(m.zone).startsWith(m.region || "\u0000") ? m.zone
        : [m.region, m.zone].filter(Boolean).join(" / ");
      td[2].replaceChildren(dot, document.createTextNode(where));
      td[1].title = [m.address, m.http ? "http " + m.http : ""].filter(Boolean).join("  ");
      td[3].textContent = m.name === self ? "\u2013" : typeof m.rtt_ms === "number" ? fmtMs(m.rtt_ms) : "?";
      td[4].replaceChildren(loadBar(m.load, 36));
      td[5].textContent = m.incarnation ?? "";
      frag.append(tr);
    }
    body.append(frag);
    for (const tr of existing.values()) tr.remove();
    $("members-total").textContent = rows.length === snap.members.length
      ? `${snap.members.length} known`
      : `${rows.length} of ${snap.members.length} shown`;
  }

  // ---------------------------------------------------------------- load panel

  function renderLoad(snap) {
    const box = $("load-bars");
    box.replaceChildren();
    const live = snap.members.filter((m) => m.state === "alive" || m.state === "suspect");
    let running = 0, slots = 0, queued = 0, reporting = 0;
    for (const m of live) {
      if (!m.load) continue;
      reporting += 1;
      running += m.load.running || 0;
      slots += m.load.slots || 0;
      queued += m.load.queued || 0;
    }
    $("load-summary").textContent = reporting
      ? `${running}/${slots} slots busy, ${queued} queued`
      : "no load reports yet";
    const util = (m) => (m.load && m.load.slots ? (m.load.running + m.load.queued) / m.load.slots : -1);
    const sorted = live.slice().sort((a, b) => util(b) - util(a) || byName(a.name, b.name));
    for (const m of sorted) {
      const name = el("span", "lb-name");
      const dot = el("span", "region-dot");
      dot.style.background = regionColor(m.region);
      name.append(dot, document.createTextNode(m.name));
      const bar = loadBar(m.load, 0);
      const barEl = bar.querySelector(".bar");
      const val = el("span", "lb-val", m.load ? `${m.load.running}/${m.load.slots}${m.load.queued ? ` +${m.load.queued}q` : ""}` : "idle");
      box.append(name, barEl, val);
    }
  }

  // ---------------------------------------------------------------- charts

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function drawChart(svgEl, points, series, unit) {
    const w = Math.max(200, svgEl.clientWidth || 400);
    const h = Math.max(80, svgEl.clientHeight || 130);
    svgEl.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svgEl.setAttribute("preserveAspectRatio", "none");
    svgEl.replaceChildren();
    const left = 44, right = 8, top = 8, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    if (points.length < 2) {
      const t = svg("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "chart-empty" });
      t.textContent = points.length ? "collecting\u2026" : "no data yet";
      svgEl.append(t);
      return;
    }
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const span = Math.max(1e-9, t1 - t0);
    let vmax = 0;
    for (const p of points) for (const s of series) vmax = Math.max(vmax, Number(p[s.key]) || 0);
    vmax = niceMax(vmax);
    const X = (t) => left + ((t - t0) / span) * pw;
    const Y = (v) => top + ph - (Math.min(v, vmax) / vmax) * ph;
    for (const f of [0, 0.5, 1]) {
      const y = Y(vmax * f);
      svgEl.append(svg("line", { x1: left, x2: w - right, y1: y, y2: y, class: "axis" }));
      const lab = svg("text", { x: left - 5, y: y + 3.5, "text-anchor": "end", class: "chart-tick" });
      lab.textContent = fmtNum(vmax * f) + (f === 1 ? unit : "");
      svgEl.append(lab);
    }
    const tl = svg("text", { x: left, y: h - 4, class: "chart-tick" });
    tl.textContent = "\u2212" + fmtAge(span);
    const tr = svg("text", { x: w - right, y: h - 4, "text-anchor": "end", class: "chart-tick" });
    tr.textContent = "now";
    svgEl.append(tl, tr);
    for (const s of series) {
      // A null value (no task ended that second) breaks the line; a lone point is a dot.
      const runs = [[]];
      for (const p of points) {
        const v = p[s.key];
        if (typeof v === "number" && isFinite(v)) runs[runs.length - 1].push([X(p.t), Y(v)]);
        else if (runs[runs.length - 1].length) runs.push([]);
      }
      for (const run of runs) {
        if (!run.length) continue;
        const coords = run.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
        if (run.length === 1) {
          svgEl.append(svg("circle", { cx: run[0][0], cy: run[0][1], r: 2.5, class: "dot " + s.cls }));
          continue;
        }
        if (s.area) {
          svgEl.append(svg("polygon", {
            points: `${run[0][0].toFixed(1)},${top + ph} ${coords} ${run[run.length - 1][0].toFixed(1)},${top + ph}`,
            class: "area " + s.cls,
          }));
        }
        svgEl.append(svg("polyline", { points: coords, class: "series " + s.cls }));
      }
    }
  }

  const TASK_SERIES = [
    { key: "tasks_done_per_s", cls: "done", area: true },
    { key: "tasks_failed_per_s", cls: "failed" },
  ];

  function sumKey(pts, key) {
    return pts.reduce((a, p) => a + (Number(p[key]) || 0), 0);
  }

  function renderCharts(snap) {
    const pts = ui.history;
    const tp = $("chart-throughput");
    drawChart(tp, pts, TASK_SERIES, "/s");
    tp.dataset.points = String(pts.length);
    tp.dataset.first = pts.length ? String(pts[0].t) : "";
    tp.dataset.loaded = String(ui.historyLoaded);
    drawChart($("chart-latency"), pts, [
      { key: "latency_p50_ms", cls: "p50" },
      { key: "latency_p99_ms", cls: "p99" },
    ], " ms");
    const last = pts[pts.length - 1];
    $("tp-now").textContent = last ? fmtNum(last.tasks_done_per_s || 0) + " /s" : "";
    $("lat-now").textContent = last && typeof last.latency_p50_ms === "number"
      ? `p50 ${fmtMs(last.latency_p50_ms)} \u00b7 p99 ${fmtMs(last.latency_p99_ms)}` : "";
    // Mesh-wide: every live node's tasks done and failed, summed per second. The newest
    // second is left out: not every node has closed it yet.
    const mp = snap.mesh_points || {};
    const total = (mp.total || []).filter((p) => p && typeof p.t === "number").slice(0, -1);
    const mesh = $("chart-mesh");
    drawChart(mesh, total, TASK_SERIES, "/s");
    const failed = sumKey(total, "tasks_failed_per_s");
    const done = sumKey(total, "tasks_done_per_s");
    mesh.dataset.failed = String(failed);
    mesh.dataset.done = String(done);
    const lastM = total[total.length - 1];
    const now = $("mesh-now");
    now.textContent = lastM ? fmtNum(lastM.tasks_done_per_s) + " /s"
      + (failed ? ` \u00b7 ${Math.max(1, Math.round(failed))} failed` : "") : "";
    now.classList.toggle("bad", failed > 0);
    if (total.length > 1) now.title = `over the last ${fmtAge(total[total.length - 1].t - total[0].t)}: `
      + `${fmtNum(done)} done, ${fmtNum(failed)} failed (${mp.nodes_answered} of ${mp.nodes_asked} nodes answered)`;
  }

  // ---------------------------------------------------------------- node resources

  function sparkline(values, cls) {
    const s = svg("svg", { class: "spark", viewBox: "0 0 80 18", preserveAspectRatio: "none" });
    const vs = values.map((v) => (typeof v === "number" && isFinite(v) ? v : null));
    const nums = vs.filter((v) => v !== null);
    if (nums.length < 2) return s;
    const max = Math.max(...nums) || 1;
    const step = 80 / Math.max(1, vs.length - 1);
    const coords = [];
    vs.forEach((v, i) => { if (v !== null) coords.push(`${(i * step).toFixed(1)},${(17 - (v / max) * 16).toFixed(1)}`); });
    s.append(svg("polyline", { points: coords.join(" "), class: cls || "" }));
    return s;
  }

  function numCell(text, value, cls) {
    const td = el("td", "num " + (cls || ""), text);
    if (typeof value === "number" && isFinite(value)) td.dataset.value = String(value);
    return td;
  }

  function sparkCell(...lines) {
    const td = el("td", "spark-cell");
    const wrap = lines.length > 1 ? el("div", "spark-stack") : td;
    for (const [values, cls] of lines) {
      const sp = sparkline(values, cls);
      if (lines.length > 1) sp.style.position = "absolute";
      wrap.append(sp);
    }
    if (lines.length > 1) { wrap.style.position = "relative"; wrap.style.height = "18px"; td.append(wrap); }
    return td;
  }

  function renderResources(snap) {
    const mp = snap.mesh_points || { nodes: {} };
    const nodes = mp.nodes || {};
    const live = snap.members.filter((m) => m.state === "alive" || m.state === "suspect").map((m) => m.name);
    const names = [...new Set([...Object.keys(nodes), ...live])].sort(byName);
    $("resources-summary").textContent = mp.nodes_asked
      ? `${mp.nodes_answered} of ${mp.nodes_asked} live nodes answered` : "";
    const body = $("resources-body");
    body.replaceChildren();
    for (const name of names) {
      const pts = nodes[name] || [];
      const last = pts[pts.length - 1];
      const tr = el("tr", last ? "" : "no-answer");
      tr.dataset.node = name;
      const nameTd = el("td", "", name);
      if (!last) {
        const td = el("td", "sub", "no points (did not answer, or serves no HTTP)");
        td.colSpan = 7;
        tr.append(nameTd, td);
        body.append(tr);
        continue;
      }
      const col = (k) => pts.map((p) => p[k]);
      const cpu = Number(last.cpu_ratio);
      const rss = last.memory_rss_bytes;
      const free = last.disk_free_bytes, used = last.disk_used_bytes;
      const nin = last.net_in_bytes_per_s, nout = last.net_out_bytes_per_s;
      tr.append(
        nameTd,
        numCell(isFinite(cpu) ? (cpu * 100).toFixed(1) + " %" : "\u2013", cpu * 100, "cpu"),
        sparkCell([col("cpu_ratio")]),
        numCell(typeof rss === "number" ? fmtBytes(rss) : "\u2013", rss, "mem"),
        sparkCell([col("memory_rss_bytes")]),
        numCell(typeof free === "number" ? `${fmtBytes(free)} / ${fmtBytes(used)}` : "\u2013", free, "disk"),
        numCell(typeof nin === "number" ? `${fmtBytes(nin)}/s / ${fmtBytes(nout)}/s` : "\u2013",
          typeof nin === "number" ? nin + nout : null, "net"),
        sparkCell([col("net_in_bytes_per_s"), ""], [col("net_out_bytes_per_s"), "net-out"]),
      );
      body.append(tr);
    }
  }

  // ---------------------------------------------------------------- task stream

  // Like Dask's task stream: one lane per node, a bar per recent task from its submit to
  // its end (or now), failures in red. Overlapping tasks of a node take sub-rows.
  function renderTimeline(snap) {
    const box = $("timeline");
    const tasks = ((snap.tasks || {}).tasks || []).filter((t) => t.node && typeof t.submitted_at === "number");
    const last = ui.history[ui.history.length - 1];
    const now = last ? Math.max(last.t, Date.now() / 1000) : Date.now() / 1000;
    const w = Math.max(300, box.clientWidth || 800);
    box.replaceChildren();
    if (!tasks.length) {
      box.setAttribute("viewBox", `0 0 ${w} 40`);
      box.setAttribute("height", "40");
      const t = svg("text", { x: w / 2, y: 24, "text-anchor": "middle", class: "tl-empty" });
      t.textContent = "No tasks yet.";
      box.append(t);
      $("timeline-summary").textContent = "";
      return;
    }
    const oldest = Math.min(...tasks.map((t) => t.submitted_at));
    const span = Math.min(TIMELINE_MAX_S, Math.max(TIMELINE_MIN_S, now - oldest + 2));
    const t0 = now - span;
    const left = 90, right = 10, top = 4, laneH = 8, gap = 6, axisH = 16;
    const X = (t) => left + ((Math.max(t0, Math.min(now, t)) - t0) / span) * (w - left - right);
    const lanes = new Map();
    for (const name of snap.members.filter((m) => m.state === "alive" || m.state === "suspect").map((m) => m.name)) lanes.set(name, []);
    const shown = tasks.filter((t) => {
      const end = t.submitted_at + (Number(t.duration_ms) || 0) / 1000;
      return end >= t0;
    }).sort((a, b) => a.submitted_at - b.submitted_at);
    for (const t of shown) {
      if (!lanes.has(t.node)) lanes.set(t.node, []);
      lanes.get(t.node).push(t);
    }
    const names = [...lanes.keys()].sort(byName);
    // Greedy sub-rows: a bar goes in the first sub-row whose last bar has ended.
    const layout = new Map();
    let y = top;
    for (const name of names) {
      const ends = [];
      const placed = [];
      for (const t of lanes.get(name)) {
        const x0 = X(t.submitted_at);
        const x1 = Math.max(x0 + 2, X(t.submitted_at + (Number(t.duration_ms) || 0) / 1000));
        let row = ends.findIndex((e) => e <= x0);
        if (row < 0) row = ends.length < TIMELINE_SUBROWS ? ends.length : ends.indexOf(Math.min(...ends));
        ends[row] = x1;
        placed.push([t, x0, x1, row]);
      }
      const rows = Math.max(1, ends.length);
      layout.set(name, { y, rows, placed });
      y += rows * laneH + gap;
    }
    const h = y + axisH;
    box.setAttribute("viewBox", `0 0 ${w} ${h}`);
    box.setAttribute("height", String(h));
    for (let k = 0; k <= 4; k++) {
      const x = left + (k / 4) * (w - left - right);
      box.append(svg("line", { x1: x, x2: x, y1: top, y2: h - axisH, class: "grid-line" }));
      const lab = svg("text", { x, y: h - 4, "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle", class: "tick" });
      lab.textContent = k === 4 ? "now" : "\u2212" + fmtAge(span * (1 - k / 4));
      box.append(lab);
    }
    let failed = 0;
    for (const name of names) {
      const lane = layout.get(name);
      const g = svg("g", { class: "tl-lane" });
      g.dataset.node = name;
      g.append(svg("rect", { x: left, y: lane.y, width: w - left - right, height: lane.rows * laneH, class: "lane" }));
      const lab = svg("text", { x: left - 6, y: lane.y + (lane.rows * laneH) / 2 + 4, "text-anchor": "end", class: "lane-name" });
      lab.textContent = name;
      g.append(lab);
      for (const [t, x0, x1, row] of lane.placed) {
        const state = t.running ? "running" : t.state;
        if (t.state === "failed") failed += 1;
        const r = svg("rect", { x: x0.toFixed(1), y: lane.y + row * laneH + 1, width: (x1 - x0).toFixed(1), height: laneH - 2, class: "tl-bar " + state });
        r.dataset.task = t.id;
        r.dataset.state = t.state;
        r.dataset.durationMs = String(t.duration_ms);
        const tip = svg("title");
        tip.textContent = `${t.name} on ${t.node}: ${t.state}, ${fmtMs(t.duration_ms)}` + (t.error ? "\n" + t.error : "");
        r.append(tip);
        g.append(r);
      }
      box.append(g);
    }
    $("timeline-summary").textContent = `${shown.length} tasks in the last ${fmtAge(span)}`
      + (failed ? `, ${failed} failed` : "");
  }

  // ---------------------------------------------------------------- objects

  function renderObjects(snap) {
    const objs = (snap.objects || []).slice();
    const states = new Map(snap.members.map((m) => [m.name, m.state]));
    objs.sort((a, b) => (b.under_replicated ? 1 : 0) - (a.under_replicated ? 1 : 0) || byName(a.id, b.id));
    const under = objs.filter((o) => o.under_replicated).length;
    const bytes = objs.reduce((s, o) => s + (Number(o.size) || 0), 0);
    // A mesh with more objects than the snapshot's page: the counts are of that page
    // (the rest: meshscale objects, or /api/v1/objects and its next).
    const more = Boolean(snap.objects_more);
    $("objects-summary").textContent = objs.length
      ? (more ? `The first ${objs.length} objects (more in the mesh: meshscale objects --after), `
        : `${objs.length} objects, `) + fmtBytes(bytes)
        + (under ? `, ${under} under-replicated` : more ? ", these fully replicated" : ", all fully replicated")
        + (objs.length > MAX_OBJECT_ROWS ? ` (first ${MAX_OBJECT_ROWS} shown)` : "")
      : "";
    const body = $("objects-body");
    body.replaceChildren();
    if (!objs.length) {
      const tr = el("tr");
      const td = el("td", "objects-empty", "No objects stored yet.");
      td.colSpan = 4;
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const o of objs.slice(0, MAX_OBJECT_ROWS)) {
      const tr = el("tr");
      tr.dataset.object = o.id;
      const idTd = el("td", "mono", shortId(o.id));
      idTd.title = o.id;
      if (o.under_replicated) idTd.append(el("span", "badge under", "under-replicated"));
      const cls = el("td");
      if (o.data_class) cls.append(el("span", "badge cls", o.data_class));
      const res = Array.isArray(o.residency) ? o.residency.join(", ") : o.residency;
      if (res) cls.append(document.createTextNode(" " + res));
      if (!cls.childNodes.length) cls.append(el("span", "sub", "\u2013"));
      const chips = el("td");
      const replicas = o.replicas || [];
      const holders = new Set(o.holders || []);
      for (const name of [...replicas, ...[...holders].filter((h) => !replicas.includes(h))]) {
        const st = states.get(name);
        let kind = "ok";
        let why = "replica, held";
        if (st === "dead" || st === "left" || st === "removed") { kind = "down"; why = `on a ${st} node`; }
        else if (!replicas.includes(name)) { kind = "extra"; why = "holds a copy outside the replica set"; }
        else if (!holders.has(name)) { kind = "missing"; why = "should hold a replica, does not yet"; }
        const chip = el("span", "chip " + kind, name);
        chip.title = `${name}: ${why}`;
        chip.dataset.node = name;
        chips.append(chip);
      }
      tr.append(idTd, el("td", "num", fmtBytes(o.size)), cls, chips);
      body.append(tr);
    }
  }

  // ---------------------------------------------------------------- tasks

  // The newest tasks of every live owner (the node asks each), failures first in the
  // summary and highlighted in the table, so a failed task cannot go unnoticed.
  function renderTasks(snap) {
    const view = snap.tasks || { tasks: [], counts: {} };
    const rows = view.tasks || [];
    const counts = view.counts || {};
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const failed = counts.failed || 0;
    const parts = [];
    if (failed) parts.push(`${failed} failed`);
    for (const st of ["running", "pending", "done", "cancelled"]) if (counts[st]) parts.push(`${counts[st]} ${st}`);
    let summary = total ? `${total} listed: ` + parts.join(", ") : "";
    if (view.nodes_asked && view.nodes_answered < view.nodes_asked) {
      summary += ` (${view.nodes_asked - view.nodes_answered} of ${view.nodes_asked} nodes did not answer)`;
    }
    const sum = $("tasks-summary");
    sum.textContent = summary;
    sum.classList.toggle("bad", failed > 0);
    const body = $("tasks-body");
    body.replaceChildren();
    if (!rows.length) {
      const tr = el("tr");
      const td = el("td", "tasks-empty", "No tasks yet.");
      td.colSpan = 6;
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const t of rows) {
      const tr = el("tr", t.state === "failed" ? "task-failed" : "");
      tr.dataset.task = t.id;
      tr.dataset.state = t.state;
      const dur = typeof t.duration_ms === "number" ? fmtMs(t.duration_ms) + (t.running ? "+" : "") : "\u2013";
      const err = el("td", "err", t.error || "");
      err.title = t.error || "";
      const dot = t.id.lastIndexOf(".");  // a map's tasks: <submit id>.<n>
      const id = el("td", "mono", dot > 0 ? t.id.slice(0, 8) + "\u2026" + t.id.slice(dot) : shortId(t.id));
      id.title = t.id + (t.reason ? "\n" + t.reason : "");
      tr.append(el("td", "mono", t.name || "-"), el("td", "state", t.state),
        el("td", "", t.node || "\u2013"), el("td", "num", dur), err, id);
      body.append(tr);
    }
  }

  // ---------------------------------------------------------------- streams

  const RATE_WINDOW_MS = 10000;
  const MAX_STREAM_ROWS = 300;
  const MAX_RUNNER_CHIPS = 16;

  // Per-second rate of a counter over the last RATE_WINDOW_MS. The node caches its streams
  // fan-out for a couple of seconds, so a rate between two consecutive snapshots would
  // jump between 0 and a burst; a window smooths that. A counter going down (a node that
  // counted some of it died) starts the history over.
  function counterRate(key, value, now) {
    let h = ui.counterHist.get(key);
    if (!h || (h.length && value < h[h.length - 1][1])) h = [];
    h.push([now, value]);
    while (h.length > 2 && now - h[1][0] >= RATE_WINDOW_MS) h.shift();
    ui.counterHist.set(key, h);
    const [t0, v0] = h[0];
    return now - t0 >= 1500 ? ((value - v0) * 1000) / (now - t0) : null;
  }

  function placementText(op) {
    if (op.mode === "near-source") return "near-source";
    if (op.mode === "central") return "central in " + (op.region || "?");
    return "in " + (op.region || "its regions");
  }

  function nodeDot(region) {
    const dot = el("span", "region-dot");
    dot.style.background = regionColor(region);
    return dot;
  }

  // "node-0~3" -> ["node-0", "3"]: a shard source is a node and the epoch it started with.
  function splitSource(sid) {
    sid = String(sid || "");
    const i = sid.lastIndexOf("~");
    return i < 0 ? [sid, ""] : [sid.slice(0, i), sid.slice(i + 1)];
  }

  function crossLabel(label) {
    const i = label.indexOf(":");
    const topic = i < 0 ? label : label.slice(0, i);
    const kind = i < 0 ? "" : label.slice(i + 1);
    let what = kind;
    if (kind === "repl") what = "copied to backups";
    else if (kind === "follow") what = "mirrored for subscribers";
    else if (kind.startsWith("fetch:")) what = "read by " + kind.slice(6);
    return [topic, what];
  }

  function renderStreams(snap) {
    const card = $("streams-card");
    const st = snap.streams;
    if (!st || typeof st !== "object") { card.hidden = true; return; }
    card.hidden = false;
    const now = Date.now();
    const members = new Map(snap.members.map((m) => [m.name, m]));
    const stateOf = (n) => (members.get(n) || {}).state || "unknown";
    const regionOf = (n) => (members.get(n) || {}).region;
    const down = (n) => { const s = stateOf(n); return s === "dead" || s === "left" || s === "removed" || s === "unknown"; };
    const ops = (st.operators || []).slice().sort((a, b) => byName(a.name, b.name));
    const shards = (st.shards || []).slice();
    const cross = Object.entries(st.cross_region_bytes || {}).filter(([, v]) => Number(v) > 0);

    const live = snap.members.filter((m) => m.state === "alive" || m.state === "suspect").length;
    const answered = Number(st.nodes_answered) || 0;
    const ans = $("streams-answered");
    ans.textContent = `stats from ${answered} of ${live} live nodes`;
    ans.classList.toggle("warn", answered < live);

    if (!ops.length && !shards.length) {
      $("streams-body").hidden = true;
      $("streams-empty").hidden = false;
      $("streams-empty").textContent = "No stream operators yet: mesh.operator(topic, fn, output=...) "
        + "registers one, and it runs next to the shards of its topic.";
      $("streams-summary").textContent = "";
      return;
    }
    $("streams-body").hidden = false;
    $("streams-empty").hidden = true;

    // One logical shard per (topic, source): its copies (primary on the source, a backup).
    const logical = new Map();
    for (const sh of shards) {
      const key = sh.topic + "\u0000" + sh.source;
      let g = logical.get(key);
      if (!g) {
        g = { topic: sh.topic, source: sh.source, copies: [], head: 0, backlog: 0 };
        logical.set(key, g);
      }
      g.copies.push(sh);
      g.head = Math.max(g.head, Number(sh.head) || 0);
      // the copy consumers read: the primary while its source lives, else the backup
      if (sh.role === "primary" || !g.copies.some((c) => c.role === "primary")) {
        g.backlog = Number(sh.backlog) || 0;
      }
    }
    // A shard's source is "node~epoch" (a restarted node starts new shards). It is live
    // while its node reports the primary copy; without one it is down if the node is, or
    // if the node now reports a newer epoch's primary (the old shard lives on its backup).
    const liveSids = new Set(shards.filter((c) => c.role === "primary").map((c) => c.source));
    const primaryNodes = new Set([...liveSids].map((sid) => splitSource(sid)[0]));
    const sourceDown = (sid) => {
      if (liveSids.has(sid)) return "";
      const name = splitSource(sid)[0];
      if (down(name)) return stateOf(name);
      return primaryNodes.has(name) ? "restarted" : "";
    };
    const sourcesOf = new Map();
    for (const g of logical.values()) {
      if (!sourcesOf.has(g.topic)) sourcesOf.set(g.topic, []);
      sourcesOf.get(g.topic).push(g.source);
    }

    // ---- operators
    let failovers = 0;
    let orphans = 0;
    const body = $("stream-ops-body");
    body.replaceChildren();
    if (!ops.length) {
      const tr = el("tr");
      const td = el("td", "objects-empty", "No operators registered (shards below hold published records).");
      td.colSpan = 5;
      tr.append(td);
      body.append(tr);
    }
    for (const op of ops.slice(0, MAX_STREAM_ROWS)) {
      const tr = el("tr");
      tr.dataset.operator = op.name;
      tr.append(el("td", "op-name", op.name));
      const flow = el("td", "mono");
      flow.append(document.createTextNode(op.topic), el("span", "arrow", " \u2192 "),
        op.output ? document.createTextNode(op.output) : el("span", "sub", "(no output)"));
      tr.append(flow);
      const place = el("td");
      const pb = el("span", "badge place place-" + op.mode, placementText(op));
      if (op.mode !== "near-source" && op.region) pb.prepend(nodeDot(op.region));
      place.append(pb);
      tr.append(place);
      const n = Number(op.records_processed) || 0;
      const rate = counterRate("op:" + op.name, n, now);
      const proc = el("td", "num processed");
      proc.dataset.count = String(n);
      proc.title = "summed over the nodes that answered (a dead node's share is no longer counted)";
      proc.append(el("b", null, n.toLocaleString("en-US")));
      if (rate !== null) proc.append(el("span", "rate", ` ${fmtNum(rate)}/s`));
      tr.append(proc);

      const chips = el("td", "runners");
      const runners = (op.runners || []).map((r) => {
        const s = String(r);
        const i = s.indexOf("/");
        return i < 0 ? { node: s, source: "" } : { node: s.slice(0, i), source: s.slice(i + 1) };
      }).sort((a, b) => byName(a.source, b.source) || byName(a.node, b.node));
      const covered = new Set(runners.map((r) => r.source));
      const made = []; // [problem?, chip]
      for (const r of runners) {
        const src = splitSource(r.source)[0];
        const gone = sourceDown(r.source);
        const chip = el("span", "chip runner");
        chip.dataset.node = r.node;
        chip.dataset.source = r.source;
        chip.append(nodeDot(regionOf(r.node)), el("b", null, r.node));
        let kind = "local";
        let why = `${r.node} runs ${op.name} on its own shard (${r.source}): the data does not move`;
        if (r.node === src && !gone) {
          chip.append(el("span", "chip-sub", " own shard"));
        } else {
          chip.append(el("span", "chip-sub", ` \u2190 ${src}'s shard`));
          if (gone) {
            kind = "failover";
            failovers += 1;
            chip.append(el("span", "chip-tag", op.mode === "near-source" ? "failed over" : "reads backup"));
            why = `${src} is ${gone}: ${r.node} runs ${op.name} on its shard (${r.source}) from the backup copy`;
          } else {
            kind = "remote";
            why = `${r.node} runs ${op.name} on ${src}'s shard (${r.source}), fetching the records from ${src}`
              + (regionOf(r.node) !== regionOf(src) ? ` across regions (${regionOf(src)} \u2192 ${regionOf(r.node)})` : "");
          }
        }
        chip.classList.add(kind);
        chip.title = why;
        made.push([kind === "failover", chip]);
      }
      for (const source of (sourcesOf.get(op.topic) || []).slice().sort(byName)) {
        if (covered.has(source)) continue;
        orphans += 1;
        const src = splitSource(source)[0];
        const gone = sourceDown(source);
        const chip = el("span", "chip runner orphan");
        chip.dataset.source = source;
        chip.append(el("span", "chip-sub", `${src}'s shard: no runner`));
        chip.title = `no live node runs ${op.name} on ${source} right now`
          + (gone ? ` (${src} is ${gone}; its backup takes over at the next reconcile)` : "");
        made.push([true, chip]);
      }
      // Failovers and orphans first; a big mesh folds the healthy rest into "+N more".
      const shown = [...made.filter((m) => m[0]), ...made.filter((m) => !m[0])].map((m) => m[1]);
      for (const chip of shown.slice(0, MAX_RUNNER_CHIPS)) chips.append(chip);
      if (shown.length > MAX_RUNNER_CHIPS) {
        const rest = shown.slice(MAX_RUNNER_CHIPS);
        const more = el("span", "chip more", `+${rest.length} more`);
        more.title = rest.map((c) => c.textContent).join("\n");
        chips.append(more);
      }
      if (!chips.childNodes.length) chips.append(el("span", "sub", "no shards of " + op.topic + " yet"));
      tr.append(chips);
      tr.classList.toggle("has-failover", chips.querySelector(".failover, .orphan") !== null);
      body.append(tr);
    }

    // ---- shards
    // operators' input topics first: that is where backlog builds up
    const inputs = new Set(ops.map((o) => o.topic));
    const groups = [...logical.values()].sort((a, b) => (inputs.has(b.topic) - inputs.has(a.topic))
      || byName(a.topic, b.topic) || byName(a.source, b.source));
    const sbody = $("stream-shards-body");
    sbody.replaceChildren();
    let backlogged = 0;
    for (const g of groups.slice(0, MAX_STREAM_ROWS)) {
      const tr = el("tr");
      tr.dataset.topic = g.topic;
      tr.dataset.source = g.source;
      if (g.backlog > 0) { tr.classList.add("backlogged"); backlogged += 1; }
      const srcName = splitSource(g.source)[0];
      const srcDown = sourceDown(g.source);
      if (srcDown) tr.classList.add("source-down");
      tr.append(el("td", "mono", g.topic));
      const src = el("td");
      src.title = g.source;
      src.append(nodeDot(regionOf(srcName)), document.createTextNode(srcName));
      if (srcDown) src.append(el("span", "badge down-badge", srcDown));
      tr.append(src);
      tr.append(el("td", "num", fmtNum(g.head)));
      const bl = el("td", "num backlog", g.backlog ? g.backlog.toLocaleString("en-US") : "0");
      tr.append(bl);
      const copies = el("td");
      for (const c of g.copies.slice().sort((a, b) => (a.role === "primary" ? -1 : 1) - (b.role === "primary" ? -1 : 1))) {
        const chip = el("span", "chip copy " + (c.role === "primary" ? "primary" : srcDown ? "serving" : "backup"));
        chip.append(nodeDot(regionOf(c.node)), document.createTextNode(c.node), el("span", "chip-sub", " " + c.role));
        chip.title = `${c.node} holds the ${c.role} copy: offsets ${c.base}..${c.head}, backlog ${c.backlog}`
          + (c.role === "backup" && srcDown ? " (serves the shard: its source is down)" : "");
        copies.append(chip);
      }
      tr.append(copies);
      sbody.append(tr);
    }
    if (!groups.length) {
      const tr = el("tr");
      const td = el("td", "objects-empty", "No shards yet: nothing published.");
      td.colSpan = 5;
      tr.append(td);
      sbody.append(tr);
    }
    $("shards-summary").textContent = groups.length
      ? `${groups.length}` + (backlogged ? `, ${backlogged} with backlog` : ", no backlog")
        + (groups.length > MAX_STREAM_ROWS ? ` (first ${MAX_STREAM_ROWS} shown)` : "")
      : "";

    // ---- bytes across regions
    const box = $("cross-bytes");
    box.replaceChildren();
    cross.sort((a, b) => b[1] - a[1] || byName(a[0], b[0]));
    const maxBytes = cross.length ? Number(cross[0][1]) : 0;
    let total = 0;
    for (const [label, v] of cross) {
      const bytes = Number(v) || 0;
      total += bytes;
      const [topic, what] = crossLabel(label);
      const name = el("span", "xb-name");
      name.append(el("span", "mono", topic), document.createTextNode(" " + what));
      name.title = label;
      const bar = el("span", "bar");
      const fill = el("span");
      fill.style.width = (maxBytes ? Math.max(2, (bytes / maxBytes) * 100) : 0).toFixed(0) + "%";
      bar.append(fill);
      const rate = counterRate("x:" + label, bytes, now);
      const val = el("span", "xb-val", fmtBytes(bytes) + (rate ? `  ${fmtBytes(Math.round(rate))}/s` : ""));
      box.append(name, bar, val);
    }
    if (!cross.length) box.append(el("div", "objects-empty", "Nothing has crossed a region boundary."));
    $("cross-summary").textContent = cross.length ? fmtBytes(total) + " total" : "";

    const parts = [`${ops.length} ${ops.length === 1 ? "operator" : "operators"}`];
    if (failovers) parts.push(`${failovers} ${failovers === 1 ? "runner" : "runners"} failed over`);
    if (orphans) parts.push(`${orphans} ${orphans === 1 ? "shard" : "shards"} without a runner`);
    if (backlogged) parts.push(`${backlogged} ${backlogged === 1 ? "shard" : "shards"} with backlog`);
    if (total) parts.push(`${fmtBytes(total)} crossed regions`);
    const sum = $("streams-summary");
    sum.textContent = parts.join("  \u00b7  ");
    sum.classList.toggle("warn", failovers + orphans > 0);
  }

  // ---------------------------------------------------------------- events

  function eventClass(kind) {
    const k = String(kind || "").toLowerCase();
    if (/dead|death|down|fail|lost|error|refus/.test(k)) return "ev-bad";
    if (/suspect|retry|under|stale|evict/.test(k)) return "ev-warn";
    if (/join|alive|refut|recover|up|done|repair|replicat/.test(k)) return "ev-good";
    return "ev-info";
  }

  function renderEvents() {
    const list = $("events");
    const evs = [...ui.events.values()].sort((a, b) => b.seq - a.seq);
    const top = list.firstElementChild;
    if (top && evs.length && top.dataset.seq === String(evs[0].seq) && list.children.length === evs.length) return;
    list.replaceChildren();
    if (!evs.length) {
      list.append(el("li", "events-empty", "No events yet."));
      return;
    }
    for (const ev of evs) {
      const li = el("li", eventClass(ev.kind));
      li.dataset.seq = ev.seq;
      li.dataset.kind = ev.kind;
      const detail = typeof ev.detail === "string" ? ev.detail
        : ev.detail && typeof ev.detail === "object"
          ? Object.entries(ev.detail).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ")
          : "";
      const d = el("span", "ev-detail");
      if (ev.node) d.append(el("b", null, ev.node), document.createTextNode(detail ? "  " + detail : ""));
      else d.textContent = detail;
      d.title = d.textContent;
      li.append(el("span", "ev-time", fmtClock(ev.time)), el("span", "ev-kind", ev.kind), d);
      list.append(li);
    }
  }

  // ---------------------------------------------------------------- formatting

  function fmtMs(ms) {
    if (typeof ms !== "number" || !isFinite(ms)) return "?";
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 10) return ms.toFixed(1) + " ms";
    return Math.round(ms) + " ms";
  }

  // ---------------------------------------------------------------- services

  const MAX_SERVICE_ROWS = 64;

  // A service's p50 from its replicas' p50s (each over its last calls), weighted by
  // their calls; its p99 is the largest replica p99 (an upper bound, not a merge).
  function serviceLatency(reps) {
    let weight = 0;
    let sum = 0;
    let p99 = null;
    for (const r of reps) {
      if (r.p50_ms !== null && r.p50_ms !== undefined) {
        const w = Math.max(1, Number(r.calls) || 0);
        weight += w;
        sum += w * Number(r.p50_ms);
      }
      if (r.p99_ms !== null && r.p99_ms !== undefined) {
        p99 = p99 === null ? Number(r.p99_ms) : Math.max(p99, Number(r.p99_ms));
      }
    }
    return { p50: weight ? sum / weight : null, p99 };
  }

  function fmtMs(v) {
    return v === null || v === undefined ? "-" : Number(v).toFixed(2);
  }

  function renderServices(snap) {
    const card = $("services-card");
    const sv = snap.services;
    if (!sv || typeof sv !== "object") { card.hidden = true; return; }
    card.hidden = false;
    const members = new Map(snap.members.map((m) => [m.name, m]));
    const regionOf = (n) => (members.get(n) || {}).region;
    const list = (sv.services || []).slice().sort((a, b) => byName(a.name, b.name));
    if (!list.length) {
      $("services-wrap").hidden = true;
      $("services-empty").hidden = false;
      $("services-empty").textContent = "No services yet: mesh.deploy(Class, name, ...) "
        + "runs a class as replicas near its callers.";
      $("services-summary").textContent = "";
      return;
    }
    $("services-wrap").hidden = false;
    $("services-empty").hidden = true;
    const body = $("services-body");
    body.replaceChildren();
    let replicas = 0;
    let unhealthy = 0;
    for (const s of list.slice(0, MAX_SERVICE_ROWS)) {
      const reps = (s.replicas || []).slice().sort((a, b) => byName(a.node, b.node));
      const ready = reps.filter((r) => r.state === "ready").length;
      replicas += reps.length;
      unhealthy += reps.filter((r) => r.state === "unhealthy").length;
      const tr = el("tr");
      tr.dataset.service = s.name;
      tr.dataset.inflight = String(Number(s.inflight) || 0);
      tr.append(el("td", "op-name", s.name));
      tr.append(el("td", null, s.placement + (s.health ? ` · health: ${s.health}` : "")));
      const count = el("td", "num replicas", `${ready}/${s.desired}`);
      count.dataset.ready = String(ready);
      count.dataset.desired = String(s.desired);
      tr.append(count);
      const chips = el("td", "replica-nodes");
      for (const r of reps) {
        const chip = el("span", "chip replica " + r.state);
        chip.dataset.node = r.node;
        chip.dataset.state = r.state;
        chip.dataset.inflight = String(Number(r.inflight) || 0);
        chip.title = `${r.node} (${r.region}): ${r.state}, ${r.inflight} in flight, `
          + `${r.calls} calls answered, ${r.failed} failed, p50 ${fmtMs(r.p50_ms)} ms, `
          + `p99 ${fmtMs(r.p99_ms)} ms`;
        chip.append(nodeDot(r.region || regionOf(r.node)), el("b", null, r.node),
          el("span", "chip-sub", ` · ${r.inflight}`));
        if (r.state !== "ready") chip.append(el("span", "chip-sub", ` ${r.state}`));
        chips.append(chip);
      }
      if (s.unplaceable) {
        chips.append(el("span", "unplaceable", `unplaceable: ${s.unplaceable}`));
        chips.classList.add("unplaceable");
      } else if (!reps.length) {
        chips.append(el("span", "sub", "no replica yet"));
      }
      tr.append(chips);
      tr.append(el("td", "num inflight", String(Number(s.inflight) || 0)));
      const lat = serviceLatency(reps);
      const p50 = el("td", "num p50", fmtMs(lat.p50));
      const p99 = el("td", "num p99", fmtMs(lat.p99));
      if (lat.p50 !== null) p50.dataset.ms = String(lat.p50);
      if (lat.p99 !== null) p99.dataset.ms = String(lat.p99);
      tr.append(p50, p99);
      const by = Object.entries(s.calls_by_region || {}).sort((a, b) => byName(a[0], b[0]));
      const src = el("td", "calls-by-region");
      for (const [region, n] of by) {
        const chip = el("span", "chip");
        chip.dataset.region = region;
        chip.append(nodeDot(region), document.createTextNode(`${region} ${fmtNum(Number(n) || 0)}`));
        src.append(chip);
      }
      if (!by.length) src.append(el("span", "sub", "no calls"));
      tr.append(src);
      body.append(tr);
    }
    $("services-summary").textContent = `${list.length} service${list.length === 1 ? "" : "s"}, `
      + `${replicas} replica${replicas === 1 ? "" : "s"}`
      + (unhealthy ? `, ${unhealthy} unhealthy` : "");
  }

  function fmtNum(v) {
    if (!isFinite(v)) return "?";
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (Math.abs(v) >= 100 || v === Math.round(v)) return String(Math.round(v));
    return v.toFixed(1);
  }

  function fmtAge(s) {
    s = Math.max(0, Math.round(Number(s) || 0));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function fmtBytes(n) {
    n = Number(n) || 0;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function fmtClock(t) {
    if (typeof t !== "number") return String(t || "");
    const d = new Date(t > 1e11 ? t : t * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function shortId(id) {
    id = String(id || "");
    return id.length > 20 ? id.slice(0, 16) + "\u2026" : id;
  }

  // Exposed for debugging in the console and for feeding synthetic snapshots.
  window.meshscaleDashboard = { applySnapshot, state: ui };

  startConnection();
})();
