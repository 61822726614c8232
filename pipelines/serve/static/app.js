// ssjdn search page: plain JS, no build step, nothing from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("ssjdn-token") || "", authRequired: false, blobs: [], items: {}, seq: 0 };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(path, init) {
  init = init || {};
  const res = await fetch(path, Object.assign({}, init, { headers: headers(init.headers) }));
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    if (res.status === 401) $("token-box").hidden = false;
    throw new Error((body && body.error) || (res.status + " " + res.statusText));
  }
  return body;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

async function loadHealth() {
  try {
    const h = await (await fetch("/health")).json();
    state.authRequired = !!h.auth_required;
    const rows = Object.entries(h.tables || {}).map(([t, v]) => v.rows + " " + t).join(", ");
    $("status").textContent = "version " + String(h.model_id).slice(0, 12) + " \u00b7 generation " + h.generation + " \u00b7 " + rows;
    if (h.limits) { $("k").max = h.limits.max_k; $("q").maxLength = h.limits.max_text_chars; }
    $("token-box").hidden = !(state.authRequired && !state.token);
  } catch (e) {
    $("status").textContent = "the server does not answer";
  }
}

function params() {
  const k = parseInt($("k").value, 10);
  const where = $("where").value.trim();
  const out = { k: Number.isFinite(k) ? k : 10, mode: $("mode").value };
  if (where) out.where = where;
  return out;
}

async function searchText(event) {
  if (event) event.preventDefault();
  const text = $("q").value.trim();
  if (!text) { showError("Type what to look for first."); $("q").focus(); return; }
  await run(() => api("/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(Object.assign({ text: text }, params())),
  }));
}

async function searchImage() {
  const file = $("image").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  const p = params();
  Object.entries(p).forEach(([k, v]) => form.append(k, String(v)));
  await run(() => api("/search/image", { method: "POST", body: form }));
  $("image").value = "";
}

async function run(request) {
  const seq = ++state.seq;
  showError("");
  $("summary").textContent = "searching\u2026";
  $("results").setAttribute("aria-busy", "true");
  try {
    const result = await request();
    if (seq !== state.seq) return; // a newer search has started
    render(result);
  } catch (e) {
    if (seq !== state.seq) return;
    clearResults();
    $("summary").textContent = "";
    showError(e.message);
  } finally {
    $("results").removeAttribute("aria-busy");
  }
}

function clearResults() {
  state.blobs.forEach((u) => URL.revokeObjectURL(u));
  state.blobs = [];
  state.items = {};
  $("results").replaceChildren();
  $("map").replaceChildren();
  $("footprints").hidden = true;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

async function setImage(img, url) {
  if (!state.token) { img.src = url; return; }
  // With a token an <img src> cannot send the header: fetch the bytes and show them as a blob.
  try {
    const res = await fetch(url, { headers: headers() });
    if (!res.ok) throw new Error(res.status);
    const blobUrl = URL.createObjectURL(await res.blob());
    state.blobs.push(blobUrl);
    img.src = blobUrl;
  } catch (e) {
    img.alt = "thumbnail unavailable";
  }
}

function render(result) {
  clearResults();
  const hits = result.hits || [];
  const t = result.timings || {};
  const ms = (t.encode_ms || 0) + (t.search_ms || 0) + (t.fetch_ms || 0);
  let summary = hits.length + " result" + (hits.length === 1 ? "" : "s") + " \u00b7 " + result.mode + " \u00b7 generation " + result.generation + " \u00b7 " + ms.toFixed(1) + " ms";
  if (result.ann && result.ann["recall@10"] !== undefined) summary += " \u00b7 ANN recall@10 " + result.ann["recall@10"];
  if (result.note) summary += " \u00b7 " + result.note;
  $("summary").textContent = summary;
  const grid = $("results");
  hits.forEach((h, i) => {
    const card = el("article", "hit");
    card.tabIndex = 0;
    card.dataset.key = h.key;
    card.dataset.index = i;
    card.setAttribute("aria-label", "result " + h.rank + ": " + (h["class"] || h.key));
    const img = el("img", "thumb");
    img.alt = h.key;
    img.loading = "eager";
    if (h.thumbnail) setImage(img, h.thumbnail);
    card.append(img);
    const line = el("div", "line");
    line.append(el("b", null, "#" + h.rank), el("span", "class", h["class"] || "\u2014"), el("span", "score", h.score.toFixed(4)));
    card.append(line);
    const caption = el("p", "caption", h.caption || "");
    card.append(caption, el("code", null, h.key));
    card.addEventListener("click", () => openDetail(h));
    card.addEventListener("keydown", (e) => onCardKey(e, h));
    card.addEventListener("focus", () => highlight(h.key, true));
    card.addEventListener("blur", () => highlight(h.key, false));
    card.addEventListener("mouseenter", () => highlight(h.key, true));
    card.addEventListener("mouseleave", () => highlight(h.key, false));
    grid.append(card);
  });
  loadItems(hits);
}

async function loadItems(hits) {
  const seq = state.seq;
  const todo = hits.filter((h) => h.item);
  const workers = Array.from({ length: Math.min(6, todo.length) }, async () => {
    while (todo.length) {
      const h = todo.shift();
      try {
        const item = await api(h.item);
        if (seq !== state.seq) return;
        state.items[h.key] = item;
        const card = document.querySelector('.hit[data-key="' + CSS.escape(h.key) + '"] .caption');
        if (card && item.captions && item.captions.length) card.textContent = item.captions[0];
      } catch (e) { /* the card keeps what the search returned */ }
    }
  });
  await Promise.all(workers);
  if (seq === state.seq) drawFootprints(hits);
}

function rings(geometry) {
  if (!geometry || !geometry.coordinates) return [];
  if (geometry.type === "Polygon") return [geometry.coordinates[0]];
  if (geometry.type === "MultiPolygon") return geometry.coordinates.map((p) => p[0]);
  return [];
}

function drawFootprints(hits) {
  const shapes = [];
  hits.forEach((h) => {
    const item = state.items[h.key];
    if (item && item.footprint) rings(item.footprint).forEach((r) => shapes.push({ key: h.key, rank: h.rank, ring: r }));
  });
  if (!shapes.length) return;
  let minx = Infinity, miny = Infinity, maxx = -Infinity, maxy = -Infinity;
  shapes.forEach((s) => s.ring.forEach(([x, y]) => {
    minx = Math.min(minx, x); maxx = Math.max(maxx, x); miny = Math.min(miny, y); maxy = Math.max(maxy, y);
  }));
  const kx = Math.cos(((miny + maxy) / 2) * Math.PI / 180) || 1; // equirectangular, scaled at the mid latitude
  const w = Math.max((maxx - minx) * kx, 1e-9), h = Math.max(maxy - miny, 1e-9);
  const W = 600, H = 300, pad = 12;
  const scale = Math.min((W - 2 * pad) / w, (H - 2 * pad) / h);
  const ox = (W - w * scale) / 2, oy = (H - h * scale) / 2; // centred
  const px = (x) => ox + (x - minx) * kx * scale, py = (y) => H - oy - (y - miny) * scale;
  const svg = $("map");
  const ns = "http://www.w3.org/2000/svg";
  shapes.forEach((s) => {
    const poly = document.createElementNS(ns, "polygon");
    poly.setAttribute("points", s.ring.map(([x, y]) => px(x).toFixed(1) + "," + py(y).toFixed(1)).join(" "));
    poly.dataset.key = s.key;
    const title = document.createElementNS(ns, "title");
    title.textContent = "#" + s.rank + " " + s.key;
    poly.append(title);
    poly.addEventListener("click", () => { const c = document.querySelector('.hit[data-key="' + CSS.escape(s.key) + '"]'); if (c) c.focus(); });
    svg.append(poly);
    const cx = s.ring.reduce((a, p) => a + p[0], 0) / s.ring.length, cy = s.ring.reduce((a, p) => a + p[1], 0) / s.ring.length;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", px(cx).toFixed(1));
    label.setAttribute("y", py(cy).toFixed(1));
    label.textContent = String(s.rank);
    svg.append(label);
  });
  $("footprints").hidden = false;
}

function highlight(key, on) {
  document.querySelectorAll('#map polygon[data-key="' + CSS.escape(key) + '"]').forEach((p) => p.classList.toggle("active", on));
  const card = document.querySelector('.hit[data-key="' + CSS.escape(key) + '"]');
  if (card) card.classList.toggle("active", on);
}

function onCardKey(e, h) {
  const cards = Array.from(document.querySelectorAll(".hit"));
  const i = cards.indexOf(e.currentTarget);
  const perRow = Math.max(1, Math.round($("results").clientWidth / (cards[0].offsetWidth + 12)));
  const move = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow }[e.key];
  if (move) {
    e.preventDefault();
    const next = cards[Math.min(cards.length - 1, Math.max(0, i + move))];
    if (next) next.focus();
  } else if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();
    openDetail(h);
  }
}

function openDetail(h) {
  const item = state.items[h.key] || {};
  $("detail-title").textContent = "#" + h.rank + " \u00b7 " + h.key;
  const img = $("detail-image");
  img.removeAttribute("src");
  img.alt = h.key;
  if (h.thumbnail) setImage(img, h.thumbnail);
  const dl = $("detail-meta");
  dl.replaceChildren();
  const rows = [["score", h.score.toFixed(6)], ["class", h["class"]], ["split", h.split], ["lat, lon", h.lat === null ? null : h.lat + ", " + h.lon]];
  (item.captions || []).forEach((c, i) => rows.push(["caption " + (i + 1), c]));
  if (item.bbox) rows.push(["bbox", item.bbox.join(", ")]);
  if (item.source) rows.push(["source", item.source]);
  rows.forEach(([k, v]) => { if (v !== null && v !== undefined) dl.append(el("dt", null, k), el("dd", null, String(v))); });
  $("detail").showModal();
}

function saveToken() {
  state.token = $("token").value.trim();
  if (state.token) sessionStorage.setItem("ssjdn-token", state.token); else sessionStorage.removeItem("ssjdn-token");
  $("token-box").hidden = !!state.token;
  showError("");
  $("q").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", searchText);
  $("image").addEventListener("change", searchImage);
  $("token-save").addEventListener("click", saveToken);
  $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveToken(); } });
  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if (e.key === "/" && !typing) { e.preventDefault(); $("q").focus(); $("q").select(); }
    if (e.key === "Escape") showError("");
  });
  loadHealth();
});
