"use strict";
const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
let tool = "pen", drawing = false, last = null, dirty = false, inFlight = false;
// Bumped by Clear: an answer to a drawing sent before it is dropped, not shown over the
// cleared pad.
let generation = 0;

function clearPad() {
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, pad.width, pad.height);
  dirty = false; generation++; show(null); setAnswered(null);
  setAck("", "");
  document.getElementById("status").textContent = "Draw something";
}
function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
function stroke(from, to) {
  ctx.strokeStyle = tool === "pen" ? "#000" : "#fff";
  ctx.lineWidth = tool === "pen" ? 18 : 34; ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(...from); ctx.lineTo(...to); ctx.stroke();
  dirty = true; setAnswered(null); schedule();
}
pad.addEventListener("pointerdown", e => { drawing = true; last = point(e);
  pad.setPointerCapture(e.pointerId); stroke(last, last); });
pad.addEventListener("pointermove", e => { if (!drawing) return; const p = point(e); stroke(last, p); last = p; });
for (const ev of ["pointerup", "pointercancel"]) pad.addEventListener(ev, () => { drawing = false; schedule(); });
pad.addEventListener("keydown", e => { if (e.key === "Delete" || e.key === "Backspace") clearPad(); });

function setTool(name) {
  tool = name;
  document.getElementById("pen").setAttribute("aria-pressed", name === "pen");
  document.getElementById("eraser").setAttribute("aria-pressed", name === "eraser");
}
document.getElementById("pen").onclick = () => setTool("pen");
document.getElementById("eraser").onclick = () => setTool("eraser");
document.getElementById("clear").onclick = clearPad;
document.getElementById("all10").onchange = () => { dirty = true; schedule(); };

// At most one request in flight; while it runs, strokes only mark the drawing dirty and the
// newest drawing is sent when it returns, so requests never pile up.
let timer = null;
function schedule() { if (!timer) timer = setTimeout(() => { timer = null; send(); }, 120); }
async function send() {
  if (inFlight || !dirty) return;
  inFlight = true; dirty = false;
  const sentIn = generation;
  const image = pad.toDataURL("image/png");
  const body = { image };
  if (document.getElementById("all10").checked) body.labels = "all";
  try {
    const r = await fetch("/v1/explain", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const data = await r.json();
    if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : r.statusText);
    if (sentIn !== generation) return;
    show(data);
    // Feedback is about the drawing this answer was for, and only while nothing was drawn
    // since: a later stroke withdraws the controls until its own answer arrives.
    if (!dirty && data.status !== "nothing_drawn")
      setAnswered({ image, digit: data.digit, bundle_version: data.bundle_version });
    document.getElementById("status").textContent = "model " + data.model_version;
  } catch (err) {
    document.getElementById("status").textContent = "Error: " + err.message;
  } finally {
    inFlight = false;
    if (dirty) schedule();
  }
}

// Feedback: "Right" stores the answer as the label, a digit button stores that digit. The
// drawing sent is the very image the answer was for. One label per drawing.
let answered = null, feedbackOff = false;
const fbDigits = document.getElementById("fb-digits");
for (let d = 0; d < 10; d++) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = String(d); b.dataset.digit = String(d);
  b.setAttribute("aria-label", `it is a ${d}`);
  b.onclick = () => sendFeedback(d);
  fbDigits.append(b);
}
document.getElementById("fb-right").onclick = () => answered && sendFeedback(answered.digit);
function setAnswered(value) {
  answered = value;
  document.getElementById("feedback").hidden = feedbackOff || value === null;
  for (const b of document.querySelectorAll("#feedback button")) {
    b.disabled = false;
    if (value && b.dataset.digit === String(value.digit)) b.disabled = true;  // that is "Right"
  }
}
function setAck(text, kind) {
  const ack = document.getElementById("fb-ack");
  ack.textContent = text; ack.className = kind;
}
async function sendFeedback(label) {
  if (!answered) return;
  const sent = answered;
  for (const b of document.querySelectorAll("#feedback button")) b.disabled = true;
  setAck("Sending…", "");
  try {
    const r = await fetch("/v1/feedback", { method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: sent.image, label, digit: sent.digit,
                             bundle_version: sent.bundle_version }) });
    const data = await r.json();
    if (r.status === 404) {
      feedbackOff = true; setAnswered(null); return;
    }
    if (r.status === 429) {
      setAck(`Too many answers at once: try again in ${r.headers.get("Retry-After")} s.`, "err");
      setAnswered(sent); return;
    }
    if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : r.statusText);
    setAck(data.created ? `Thanks: saved as a ${label}.` : `Already saved as a ${label}.`, "ok");
    document.getElementById("fb-ack").dataset.record = data.id;
  } catch (err) {
    setAck("Could not save: " + err.message, "err");
    if (answered === sent) setAnswered(sent);
  }
}
// Typing a digit while the drawing pad or a feedback control has focus answers "it is a d".
document.addEventListener("keydown", e => {
  if (!answered || !/^[0-9]$/.test(e.key)) return;
  const where = document.activeElement;
  if (where === pad || document.getElementById("feedback").contains(where)) sendFeedback(+e.key);
});

const bars = document.getElementById("bars");
for (let d = 0; d < 10; d++) {
  bars.insertAdjacentHTML("beforeend",
    `<span>${d}</span><div class="bar" id="bar${d}" role="meter" aria-label="digit ${d}"
      aria-valuemin="0" aria-valuemax="1" aria-valuenow="0"><span></span></div>
     <span id="pct${d}">–</span>`);
}
// The server answers "nothing_drawn" (no digit, no scores) for a blank pad, a dot or a
// smudge, and "low_confidence" when the best digit's probability is low: then both of the
// two most probable digits are named.
function show(data) {
  const drawn = data !== null && data.status !== "nothing_drawn";
  const probs = drawn ? data.probabilities : new Array(10).fill(0);
  const best = drawn ? data.digit : null;
  const verdict = document.getElementById("verdict");
  document.getElementById("winner").textContent = best === null ? "–" : best;
  verdict.className = drawn ? (data.status === "low_confidence" ? "unsure" : "") : "empty";
  if (!drawn) verdict.textContent = "No digit drawn";
  else if (data.status === "low_confidence") {
    const [a, b] = data.candidates;
    verdict.textContent = `Not sure: ${a} (${(100 * probs[a]).toFixed(0)}%) or ` +
      `${b} (${(100 * probs[b]).toFixed(0)}%)?`;
  } else verdict.textContent = "";
  probs.forEach((p, d) => {
    const bar = document.getElementById("bar" + d);
    bar.firstElementChild.style.width = (100 * p).toFixed(1) + "%";
    bar.classList.toggle("top", d === best);
    bar.setAttribute("aria-valuenow", p.toFixed(3));
    document.getElementById("pct" + d).textContent = drawn ? (100 * p).toFixed(1) + "%" : "–";
  });
  const maps = document.getElementById("maps");
  maps.replaceChildren();
  if (drawn) for (const ex of data.explanations)
    maps.append(mapFigure(data.features, ex.contributions,
      `${ex.label}: ${(100 * ex.probability).toFixed(1)}%`));
}

// Green where a pixel raised the digit's score, red where it lowered it, over a faint grey
// copy of the input; the colour scale is symmetric and shared by the maps of one drawing.
function mapFigure(features, contributions, caption) {
  const c = document.createElement("canvas"); c.width = c.height = 28;
  const g = c.getContext("2d"), img = g.createImageData(28, 28);
  const maxIn = Math.max(1e-9, ...features);
  const scale = Math.max(1e-9, ...contributions.map(Math.abs));
  for (let i = 0; i < 784; i++) {
    const grey = 255 - 90 * features[i] / maxIn, v = contributions[i] / scale;
    const a = Math.min(1, Math.abs(v) * 1.6);
    const [r, gr, b] = v >= 0 ? [46, 125, 50] : [198, 40, 40];
    img.data[4 * i] = grey * (1 - a) + r * a; img.data[4 * i + 1] = grey * (1 - a) + gr * a;
    img.data[4 * i + 2] = grey * (1 - a) + b * a; img.data[4 * i + 3] = 255;
  }
  g.putImageData(img, 0, 0);
  c.setAttribute("role", "img");
  c.setAttribute("aria-label", "explanation map for " + caption);
  c.dataset.positive = contributions.filter(v => v > 0).length;
  c.dataset.negative = contributions.filter(v => v < 0).length;
  const f = document.createElement("figure"), cap = document.createElement("figcaption");
  cap.textContent = caption; f.append(c, cap); return f;
}

// The gallery: test digits with their precomputed explanations.
const gDigit = document.getElementById("g-digit"), gOffset = document.getElementById("g-offset");
for (let d = 0; d < 10; d++) gDigit.add(new Option(String(d), String(d)));
async function loadExample() {
  const r = await fetch(`/v1/examples?digit=${gDigit.value}&offset=${gOffset.value}`);
  const data = await r.json();
  const info = document.getElementById("g-info"), maps = document.getElementById("g-maps");
  maps.replaceChildren();
  if (!r.ok) { info.textContent = data.detail; return; }
  gOffset.max = data.count - 1;
  info.textContent = `${data.row_key}: labelled ${data.digit}, predicted ${data.predicted} ` +
    `(${(100 * data.probabilities[data.predicted]).toFixed(1)}%), example ${data.offset + 1} of ${data.count}`;
  const order = [...data.probabilities.keys()].sort((a, b) => data.probabilities[b] - data.probabilities[a]).slice(0, 3);
  for (const d of order) maps.append(mapFigure(data.features, data.contributions[d],
    `${d}: ${(100 * data.probabilities[d]).toFixed(1)}%`));
}
gDigit.onchange = () => { gOffset.value = 0; loadExample(); };
gOffset.onchange = loadExample;
document.getElementById("g-prev").onclick = () => { gOffset.value = Math.max(0, +gOffset.value - 1); loadExample(); };
document.getElementById("g-next").onclick = () => { gOffset.value = Math.min(+gOffset.max || 0, +gOffset.value + 1); loadExample(); };

fetch("/v1/model").then(r => r.json()).then(m => {
  const acc = m.metrics.test_accuracy;
  document.getElementById("model").textContent = `Model ${m.model_name} v${m.model_version}` +
    ` (${m.algorithm}, ${m.feature_stage})` + (acc ? `, test accuracy ${(100 * acc).toFixed(2)}%` : "");
});
clearPad(); loadExample();
