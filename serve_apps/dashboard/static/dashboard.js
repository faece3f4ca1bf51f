// The dashboard's one script: live charts (uPlot) fed by the SSE fragments htmx swaps in, the training
// loss chart, and Sign-In-With-Solana through a wallet in the page (window.solana, as Phantom provides).
"use strict";

function readJson(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent || "null") : null;
}

function lineChart(el, title, labels, data) {
  const series = [{}].concat(labels.map((label, i) => ({ label, stroke: ["#9945ff", "#14a37f", "#1f6feb"][i % 3] })));
  return new uPlot({ title, width: 520, height: 220, series, scales: { x: { time: true } } }, data, el);
}

function liveCharts() {
  const ratesEl = document.getElementById("chart-rates");
  if (!ratesEl) return;
  const history = readJson("series-history") || [];
  const cols = (keys) => [history.map((p) => p.t)].concat(keys.map((k) => history.map((p) => p[k])));
  const rates = lineChart(ratesEl, "throughput", ["requests/s", "tokens/s"], cols(["requests_per_s", "tokens_per_s"]));
  const latency = lineChart(document.getElementById("chart-latency"), "latency (ms)", ["TTFT", "time per token"],
    cols(["ttft_ms", "tpot_ms"]));
  document.body.addEventListener("htmx:afterSettle", () => {
    const point = readJson("series-point");
    if (!point || point.t === undefined) return;
    history.push(point);
    while (history.length > 120) history.shift();
    rates.setData(cols(["requests_per_s", "tokens_per_s"]));
    latency.setData(cols(["ttft_ms", "tpot_ms"]));
  });
}

function lossChart() {
  const el = document.getElementById("chart-loss");
  const runs = readJson("loss-series");
  if (!el || !runs || Object.keys(runs).length === 0) return;
  const names = Object.keys(runs);
  const xs = Array.from(new Set(names.flatMap((n) => runs[n].map((p) => p[0])))).sort((a, b) => a - b);
  const data = [xs].concat(names.map((n) => {
    const at = new Map(runs[n].map((p) => [p[0], p[1]]));
    return xs.map((x) => (at.has(x) ? at.get(x) : null));
  }));
  const series = [{ label: "step / round" }].concat(names.map((n, i) => ({ label: n, stroke: ["#9945ff", "#14a37f", "#1f6feb"][i % 3], spanGaps: true })));
  new uPlot({ title: "loss", width: 640, height: 240, series, scales: { x: { time: false } } }, data, el);
}

const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
function base58(bytes) {
  let digits = [0];
  for (const byte of bytes) {
    let carry = byte;
    for (let i = 0; i < digits.length; i++) { carry += digits[i] << 8; digits[i] = carry % 58; carry = (carry / 58) | 0; }
    while (carry) { digits.push(carry % 58); carry = (carry / 58) | 0; }
  }
  let out = "";
  for (const byte of bytes) { if (byte !== 0) break; out += "1"; }
  for (let i = digits.length - 1; i >= 0; i--) out += B58[digits[i]];
  return out;
}

async function postJson(url, body) {
  const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

async function signInWithSolana() {
  const status = document.getElementById("siws-status");
  const wallet = window.solana;
  if (!wallet) { status.textContent = "no Solana wallet in this browser: paste an API key instead"; return; }
  try {
    const connected = await wallet.connect();
    const address = (connected && connected.publicKey ? connected.publicKey : wallet.publicKey).toString();
    const challenge = await postJson("/v1/auth/challenge", { wallet: address });
    const signed = await wallet.signMessage(new TextEncoder().encode(challenge.message), "utf8");
    const key = await postJson("/v1/auth/verify", { message: challenge.message, signature: base58(signed.signature || signed) });
    const form = document.getElementById("signin-key");
    form.elements.api_key.value = key.api_key;
    form.submit();
  } catch (err) {
    status.textContent = "sign-in failed: " + err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  liveCharts();
  lossChart();
  const siws = document.getElementById("siws");
  if (siws) siws.addEventListener("click", signInWithSolana);
});
