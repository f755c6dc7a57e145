// papa's labelling page. The server holds every answer (each click is saved there at once), so this script keeps only
// what the screen needs: the round shown, the selection and an undo stack. It polls api/state: fast while the model
// updates (the next round appears by itself), slowly while the person labels (to notice another tab's submit).
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const LABELS = { 1: "like", "-1": "dislike", 0: "skip" };
const PAIR = { 1: "A", "-1": "B", 0: "tie" };

let S = null;            // the last /api/state
let shownRound = -1;     // the round whose cards are in the grid
let draft = {};          // id -> value, as the server has it (optimistic between a click and its answer)
let selected = 0;
let undo = [];           // [id, previous value or null]
let submitting = false;
let previewCount = 0;

async function api(path, opts = {}) {
  const res = await fetch(path, {
    ...opts, headers: { "X-Papa-Token": TOKEN, "Content-Type": "application/json", ...(opts.headers || {}) },
  });
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  return { status: res.status, ok: res.ok, data };
}

function toast(msg, ms = 3500) {
  const t = $("toast");
  t.textContent = msg; t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, ms);
}

const isPairs = () => S && S.kind === "pair";

function buildGrid() {
  const grid = $("grid");
  grid.innerHTML = "";
  grid.classList.toggle("pairs", isPairs());
  S.ids.forEach((id, i) => {
    const card = document.createElement("div");
    card.className = "card"; card.dataset.id = id; card.dataset.index = i; card.setAttribute("role", "gridcell");
    const key = i < 9 ? String(i + 1) : i === 9 ? "0" : "";
    let imgs;
    if (isPairs()) {
      imgs = `<div class="pairimgs"><figure><img src="api/image/${S.round}/${2 * i}.png" alt="pair ${i + 1} first">A</figure>` +
             `<figure><img src="api/image/${S.round}/${2 * i + 1}.png" alt="pair ${i + 1} second">B</figure></div>`;
    } else {
      imgs = `<img src="api/image/${S.round}/${i}.png" alt="image ${i + 1}">`;
    }
    const buttons = isPairs()
      ? `<button class="a" data-v="1">A <kbd>A</kbd></button><button class="tie" data-v="0">tie <kbd>T</kbd></button><button class="b" data-v="-1">B <kbd>B</kbd></button>`
      : `<button class="like" data-v="1">like <kbd>L</kbd></button><button class="dislike" data-v="-1">dislike <kbd>D</kbd></button><button class="skip" data-v="0">skip <kbd>S</kbd></button>`;
    card.innerHTML = `<span class="num">${key ? `<kbd>${key}</kbd>` : i + 1}</span><span class="verdict"></span>${imgs}<div class="btns">${buttons}</div>`;
    card.addEventListener("click", (ev) => {
      const b = ev.target.closest("button");
      select(i);
      if (b) setLabel(i, parseInt(b.dataset.v, 10));
    });
    grid.appendChild(card);
  });
  shownRound = S.round;
  undo = [];
  selected = firstUnanswered();
}

function firstUnanswered() {
  const i = S.ids.findIndex((id) => !(id in draft));
  return i < 0 ? 0 : i;
}

function paintCards() {
  document.querySelectorAll("#grid .card").forEach((card, i) => {
    const id = card.dataset.id;
    const v = id in draft ? draft[id] : null;
    if (v === null) delete card.dataset.value; else card.dataset.value = String(v);
    card.querySelector(".verdict").textContent = v === null ? "" : (isPairs() ? PAIR[v] : LABELS[v]);
    card.querySelectorAll(".btns button").forEach((b) => b.classList.toggle("on", v !== null && parseInt(b.dataset.v, 10) === v));
    card.classList.toggle("selected", i === selected);
  });
  const n = S.ids.filter((id) => id in draft).length;
  $("answered").textContent = `${n} of ${S.ids.length} answered`;
  $("submit").disabled = n < S.ids.length || submitting;
}

function select(i) {
  if (!S || !S.ids.length) return;
  selected = Math.max(0, Math.min(S.ids.length - 1, i));
  paintCards();
}

// Label requests go to the server one after another (a quick "d" then "z" on one image must arrive in that order),
// and the selection moves at once, so keys typed faster than the server answers land on the right images.
let queue = Promise.resolve();
let pending = 0;
function enqueue(fn) {
  pending += 1;
  const run = () => fn().finally(() => { pending -= 1; });
  queue = queue.then(run, run);
  return queue;
}

function setLabel(i, value, fromUndo = false) {
  if (!S || S.status !== "labelling") return;
  const id = S.ids[i], round = S.round;
  const before = id in draft ? draft[id] : null;
  if (!fromUndo) undo.push([id, before]);
  if (value === null) delete draft[id]; else draft[id] = value;
  if (!fromUndo && value !== null) {  // move on to the next unanswered one
    const next = S.ids.findIndex((x, j) => j > i && !(x in draft));
    if (next >= 0) selected = next;
  }
  paintCards();
  return enqueue(async () => {
    const r = await api("api/label", { method: "POST", body: JSON.stringify({ round, id, value }) });
    if (r.status === 409) { toast((r.data && r.data.error) || "this round is closed"); return refresh(); }
    if (!r.ok) {
      if (before === null) delete draft[id]; else draft[id] = before;
      paintCards();
      return toast((r.data && r.data.error) || `could not save (HTTP ${r.status})`);
    }
    if (pending <= 1 && S.round === round) { draft = r.data.draft; paintCards(); }
  });
}

function doUndo() {
  const last = undo.pop();
  if (!last) return toast("nothing to undo in this round");
  const i = S.ids.indexOf(last[0]);
  select(i);
  return setLabel(i, last[1], true);
}

function submit() {
  if (!S || S.status !== "labelling" || submitting) return;
  const missing = S.ids.filter((id) => !(id in draft)).length;
  if (missing) return toast(`${missing} still without an answer (skip counts)`);
  submitting = true; paintCards();
  const round = S.round;
  return enqueue(async () => {  // after the labels still on their way
    const r = await api("api/submit", { method: "POST", body: JSON.stringify({ round }) });
    submitting = false;
    if (r.status === 409) toast((r.data && r.data.error) || "already submitted");
    else if (!r.ok) toast((r.data && r.data.error) || `could not submit (HTTP ${r.status})`);
    return refresh();
  });
}

function renderSide() {
  const b = S.budget;
  $("budget-text").textContent = `labels ${b.used} / ${b.total}`;
  $("budget-bar").style.width = `${b.total ? (100 * b.used) / b.total : 0}%`;
  $("run-info").textContent = `${S.run} · ${S.algo} · ${S.samples_per_round} ${isPairs() ? "pairs" : "images"} a round`;
  $("rounds-total").textContent = S.rounds;
  // the chart: liked fraction per submitted round, 0..1
  const h = S.history, W = 300, H = 120, pad = 18;
  const x = (k) => pad + (S.rounds > 1 ? (k - 1) * (W - 2 * pad) / (S.rounds - 1) : 0);
  const y = (f) => H - pad - f * (H - 2 * pad);
  let svg = `<line x1="${pad}" y1="${y(0)}" x2="${W - pad}" y2="${y(0)}" stroke="#bbb"/>` +
            `<line x1="${pad}" y1="${y(1)}" x2="${W - pad}" y2="${y(1)}" stroke="#eee"/>` +
            `<text x="2" y="${y(1) + 4}" font-size="9" fill="#888">1</text><text x="2" y="${y(0) + 4}" font-size="9" fill="#888">0</text>`;
  if (h.length) {
    svg += `<polyline fill="none" stroke="#2f6fdf" stroke-width="2" points="${h.map((r) => `${x(r.round)},${y(r.liked_fraction)}`).join(" ")}"/>`;
    svg += h.map((r) => `<circle class="pt" cx="${x(r.round)}" cy="${y(r.liked_fraction)}" r="3" fill="#2f6fdf"><title>round ${r.round}: ${r.like} of ${r.n}</title></circle>`).join("");
  } else {
    svg += `<text x="${W / 2}" y="${H / 2}" text-anchor="middle" font-size="11" fill="#999">no round submitted yet</text>`;
  }
  $("chart").innerHTML = svg;
  const thumbs = $("thumbs");
  if (thumbs.childElementCount !== h.length) {
    thumbs.innerHTML = h.slice().reverse().map((r) =>
      `<figure><img src="api/grid/${r.round}.png" alt="round ${r.round}" data-round="${r.round}"><figcaption>round ${r.round}: ${r.like}/${r.n}</figcaption></figure>`).join("");
  }
  $("ckpt-name").textContent = S.checkpoint ? `(${S.checkpoint})` : "(none yet)";
  const p = S.preview;
  if (p && p.count !== previewCount) {
    previewCount = p.count;
    $("preview-img").src = `api/preview.png?n=${p.count}`;
    $("preview-img").hidden = false;
    $("preview-note").textContent = `after round ${p.after_round}, drawn in ${p.seconds} s`;
  } else if (S.preview_pending) {
    $("preview-note").textContent = S.status === "labelling" ? "drawing…" : "queued: drawn when the update is done";
  }
  $("keys-text").innerHTML = isPairs()
    ? "<kbd>1</kbd>–<kbd>0</kbd> pick a pair, <kbd>←</kbd><kbd>→</kbd><kbd>↑</kbd><kbd>↓</kbd> move, <kbd>A</kbd> first better, <kbd>B</kbd> second better, <kbd>T</kbd> tie, <kbd>Z</kbd> undo, <kbd>Enter</kbd> submit, <kbd>P</kbd> fresh images"
    : "<kbd>1</kbd>–<kbd>0</kbd> pick an image, <kbd>←</kbd><kbd>→</kbd><kbd>↑</kbd><kbd>↓</kbd> move, <kbd>L</kbd> like, <kbd>D</kbd> dislike, <kbd>S</kbd> skip, <kbd>Z</kbd> undo, <kbd>Enter</kbd> submit, <kbd>P</kbd> fresh images";
}

function render() {
  document.body.dataset.status = S.status;
  document.body.dataset.round = S.round;
  $("round-no").textContent = S.round || "–";
  const labelling = S.status === "labelling";
  if (labelling && shownRound !== S.round) { draft = S.draft; buildGrid(); }
  else if (labelling && !submitting && pending === 0) { draft = { ...S.draft }; }
  $("grid").hidden = !labelling;
  $("answered").hidden = !labelling;
  document.querySelector(".actions").hidden = !labelling;
  $("instructions").textContent = labelling
    ? (isPairs() ? "For each pair, which one do you like better? A, B, or tie." : "Like the images you want more of, dislike the ones you want less of, skip when unsure.")
    : "";
  $("working").hidden = !(S.status === "working" || S.status === "starting");
  $("done").hidden = S.status !== "done";
  if (!$("working").hidden) {
    const p = S.progress;
    const frac = p.total ? p.done / p.total : 0;
    $("phase").textContent = p.message || p.phase;
    $("progress-bar").style.width = `${p.phase === "update" ? 100 * frac : p.phase === "sampling" ? 100 : 50}%`;
    $("phase-detail").textContent = (p.total ? `${p.done} of ${p.total} steps · ` : "") + `${p.elapsed} s`;
  }
  if (labelling) paintCards();
  renderSide();
}

async function refresh() {
  const r = await api("api/state");
  if (!r.ok) {
    toast((r.data && r.data.error) || `server said HTTP ${r.status}`, 10000);
    return false;
  }
  S = r.data;
  render();
  return true;
}

async function poll() {
  let ok = false;
  try { ok = await refresh(); } catch (e) { toast("the server does not answer; retrying…", 2500); }
  const fast = !S || S.status === "working" || S.preview_pending;
  setTimeout(poll, !ok ? 2000 : fast ? 250 : 2000);  // bench/bench_serve.py polls as fast
}

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (!$("zoom").hidden && ev.key === "Escape") { $("zoom").hidden = true; return; }
  const k = ev.key.toLowerCase();
  if (k === "p") { askPreview(); return; }
  if (!S || S.status !== "labelling") return;
  const cols = isPairs() ? 2 : 5;
  let handled = true;
  if (/^[0-9]$/.test(k)) select(k === "0" ? 9 : parseInt(k, 10) - 1);
  else if (k === "arrowright") select(selected + 1);
  else if (k === "arrowleft") select(selected - 1);
  else if (k === "arrowdown") select(selected + cols);
  else if (k === "arrowup") select(selected - cols);
  else if (k === "z") doUndo();
  else if (k === "enter") submit();
  else if (!isPairs() && (k === "l" || k === "d" || k === "s")) setLabel(selected, { l: 1, d: -1, s: 0 }[k]);
  else if (isPairs() && (k === "a" || k === "b" || k === "t")) setLabel(selected, { a: 1, b: -1, t: 0 }[k]);
  else handled = false;
  if (handled) ev.preventDefault();
});

async function askPreview() {
  const r = await api("api/preview", { method: "POST" });
  if (r.ok) { $("preview-note").textContent = "drawing…"; refresh(); }
}

$("submit").addEventListener("click", submit);
$("undo").addEventListener("click", doUndo);
$("preview-btn").addEventListener("click", askPreview);
$("thumbs").addEventListener("click", (ev) => {
  const img = ev.target.closest("img");
  if (!img) return;
  $("zoom").querySelector("img").src = img.src;
  $("zoom").hidden = false;
});
$("zoom").addEventListener("click", () => { $("zoom").hidden = true; });
// for scripts driving the page (tests/test_serve_browser.py): resolves once every click so far is saved
window.papa = { settled: () => queue };
poll();
