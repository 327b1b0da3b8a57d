// The live training view of ESD Erase Concept (ESDTrain): a loss chart on the node, drawn from the server's
// "esd.progress" messages (nodes/comfy_progress.py): raw points faint, the smoothed curve bright, and a status line
// with the phase, iteration count, iterations per second, ETA and loss. The preview images arrive through ComfyUI's
// own preview channel and ComfyUI shows them on the node. Without the pack's messages the node keeps ComfyUI's plain
// progress bar: the chart stays hidden (and takes no room) until the first message for its node arrives.
// Plain ES module, no build step; talks to nothing but the ComfyUI server it was loaded from.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "esd.progress";
const NODE_TYPE = "ESDTrain";
const WIDGET_NAME = "esd_live_view";
const CHART_HEIGHT = 170; // px, the widget's minimum height
const ENDINGS = { done: "#7bd88f", cancelled: "#f0b35b", failed: "#ff6b6b" };
const COLORS = { background: "#18181b", axis: "#5a5a60", raw: "rgba(90, 140, 200, 0.35)", smooth: "#78beff",
                 text: "#dcdce1" };

/** Exponential smoothing over about a thirtieth of the run (as nodes/loss_plot.py). */
export function smoothingWeight(n) {
  const span = Math.min(Math.max(n / 30, 1), 100);
  return 1 - 1 / span;
}

/** Debiased exponential moving average: early points are not pulled towards 0. */
export function smoothed(values, weight = smoothingWeight(values.length)) {
  const out = [];
  let avg = 0;
  values.forEach((v, i) => {
    avg = weight * avg + (1 - weight) * v;
    out.push(weight > 0 ? avg / (1 - weight ** (i + 1)) : v);
  });
  return out;
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(r).padStart(2, "0")}s` : `${r}s`;
}

/** A loss in at most 6 characters, for the axis. */
export function formatLoss(v) {
  return Math.abs(v) >= 0.01 && Math.abs(v) < 1000 ? v.toPrecision(3) : v.toExponential(1);
}

/** One node's chart: its state, its element and the drawing. */
class LiveView {
  constructor(node) {
    this.node = node;
    this.element = document.createElement("div");
    this.element.className = "esd-live-view";
    Object.assign(this.element.style, {
      display: "flex", flexDirection: "column", width: "100%", height: "100%", minHeight: `${CHART_HEIGHT}px`,
      boxSizing: "border-box", background: COLORS.background, borderRadius: "6px", padding: "4px 6px",
      font: "11px sans-serif", color: COLORS.text, overflow: "hidden",
      contain: "inline-size", // its long status line must not widen the node (the Vue nodes size to content)
    });
    this.active = false; // shown from the first message on: until then the node looks as it always did
    this.element.style.display = "none";
    // the canvas is laid over a flexible box, so its pixel size never feeds back into the layout
    const chart = document.createElement("div");
    Object.assign(chart.style, { flex: "1 1 auto", position: "relative", minHeight: "0" });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { position: "absolute", inset: "0", width: "100%", height: "100%" });
    chart.append(this.canvas);
    this.status = document.createElement("div");
    this.status.className = "esd-live-status";
    Object.assign(this.status.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
                                        paddingTop: "2px" });
    this.element.append(chart, this.status);
    this.reset(null);
    new ResizeObserver(() => this.draw()).observe(this.element);
  }

  reset(promptId) {
    this.promptId = promptId;
    this.steps = [];
    this.losses = [];
    this.state = { phase: "loading", step: 0, total: 0, loss: null, elapsed: null };
  }

  update(message) {
    if (!this.active) this.show();
    if (message.prompt_id !== this.promptId) this.reset(message.prompt_id);
    for (const [step, loss] of message.points ?? []) {
      if (this.steps.length && step <= this.steps.at(-1)) continue; // a resent point
      this.steps.push(step);
      this.losses.push(loss);
    }
    this.state = { ...this.state, ...message, elapsed: message.elapsed ?? this.state.elapsed };
    this.element.dataset.phase = message.phase;
    this.element.dataset.points = String(this.losses.length);
    this.status.textContent = this.statusText();
    this.status.style.color = ENDINGS[message.phase] ?? COLORS.text;
    this.draw();
  }

  show() {
    this.active = true;
    this.element.style.display = "flex";
    const node = this.node, [width, height] = node.computeSize(); // the classic canvas: make room for the chart
    node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
    node.setDirtyCanvas?.(true, true);
  }

  statusText() {
    const { phase, step, total, loss, elapsed, message } = this.state;
    if (phase in ENDINGS) return phase === "done" ? `done · ${message}`.replaceAll("\n", " · ") : message ?? phase;
    const parts = [phase, `${step}/${total}`];
    if (step > 0 && elapsed > 0) {
      const rate = step / elapsed; // the run's average: iterations differ a lot (a random number of sampling steps)
      parts.push(rate >= 1 ? `${rate.toFixed(2)} it/s` : `${(1 / rate).toFixed(1)} s/it`);
      parts.push(`ETA ${formatDuration((total - step) / rate)}`);
    }
    if (loss !== null && loss !== undefined) parts.push(`loss ${loss.toPrecision(4)}`);
    return parts.join(" · ");
  }

  draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth, height = this.canvas.clientHeight;
    if (!width || !height) return;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(height * ratio);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 38, right = width - 6, top = 6, bottom = height - 14;
    ctx.strokeStyle = COLORS.axis;
    ctx.beginPath();
    ctx.moveTo(left, top);
    ctx.lineTo(left, bottom);
    ctx.lineTo(right, bottom);
    ctx.stroke();
    ctx.fillStyle = COLORS.text;
    ctx.font = "10px sans-serif";
    const total = Math.max(this.state.total || 0, this.steps.at(-1) || 1);
    ctx.textAlign = "right";
    ctx.fillText(String(total), right, height - 2);
    ctx.textAlign = "left";
    ctx.fillText("iteration", left + 2, height - 2);
    if (!this.losses.length) return;
    let low = Infinity, high = -Infinity; // (not Math.min(...): a long run has more points than call arguments)
    for (const v of this.losses) { low = Math.min(low, v); high = Math.max(high, v); }
    if (high === low) { high += 0.5 * Math.abs(high || 1); low -= 0.5 * Math.abs(low || 1); }
    const x = (step) => left + (right - left) * (step / total);
    const y = (v) => bottom - (bottom - top) * (v - low) / (high - low);
    ctx.textAlign = "right";
    ctx.fillText(formatLoss(high), left - 3, top + 8);
    ctx.fillText(formatLoss(low), left - 3, bottom);
    // raw points, faint; at most about one per pixel column
    ctx.fillStyle = COLORS.raw;
    const stride = Math.max(1, Math.floor(this.losses.length / (right - left)));
    for (let i = 0; i < this.losses.length; i += stride) ctx.fillRect(x(this.steps[i]) - 1, y(this.losses[i]) - 1, 2, 2);
    // the smoothed curve, bright (smoothing set by the planned run length, so it does not change as points arrive)
    const smooth = smoothed(this.losses, smoothingWeight(total));
    ctx.strokeStyle = COLORS.smooth;
    ctx.lineWidth = 2;
    ctx.beginPath();
    for (let i = 0; i < smooth.length; i += stride) {
      if (i === 0) ctx.moveTo(x(this.steps[i]), y(smooth[i]));
      else ctx.lineTo(x(this.steps[i]), y(smooth[i]));
    }
    ctx.lineTo(x(this.steps.at(-1)), y(smooth.at(-1)));
    ctx.stroke();
    ctx.lineWidth = 1;
  }
}

const views = new WeakMap(); // node -> LiveView

/** The node an execution id names ("12", or "5:12" inside subgraph node 5). */
function nodeByExecutionId(executionId) {
  let graph = app.rootGraph ?? app.graph, node = null;
  for (const part of String(executionId).split(":")) {
    node = graph?.getNodeById(Number(part)) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

/** Give a node its (hidden) chart widget when it is created: the Vue-based nodes only render widgets they saw
 * before the user's first edit, so the widget cannot wait for the first message. */
function attachView(node) {
  const view = new LiveView(node);
  views.set(node, view);
  const widget = node.addDOMWidget(WIDGET_NAME, "esd-live-view", view.element, {
    serialize: false, hideOnZoom: false, getValue: () => "", setValue: () => {},
    getMinHeight: () => (view.active ? CHART_HEIGHT : 0), getMaxHeight: () => (view.active ? undefined : 0),
  });
  widget.serialize = false; // not a widget value of the saved workflow, nor an input of the prompt
  return view;
}

app.registerExtension({
  name: "esd.concept_erasure.live_view",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = nodeByExecutionId(detail.node);
      if (node) views.get(node)?.update(detail);
    });
  },
  nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE) attachView(node);
  },
});
