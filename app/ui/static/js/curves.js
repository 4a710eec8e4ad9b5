// Live training curves drawn with uPlot (vendored under ../vendor/uplot): the running loss from
// `progress` events, and per-epoch loss and accuracies from `epoch` events.

import { h } from "./dom.js";

const COLORS = { running: "#9db8e3", trainLoss: "#2456a6", trainAcc: "#2456a6", evalAcc: "#d9662b" };

function sortedRows(map) {
  return [...map.values()].sort((a, b) => a.x - b.x);
}

export class Curves {
  /** `el`: an empty container; `evalLabel`: "test" or "val"; `epochs`: the x axis runs 0..epochs. */
  constructor(el, evalLabel = "test", epochs = 1) {
    this.el = el;
    this.evalLabel = evalLabel;
    this.epochs = epochs;
    this.lossRows = new Map(); // x (epochs, fractional) -> {x, running, train}
    this.accRows = new Map(); // epoch -> {x, train, eval}
    this.lossBox = h("div", { class: "chart", id: "chart-loss" });
    this.accBox = h("div", { class: "chart", id: "chart-accuracy" });
    el.append(this.lossBox, this.accBox);
    this.charts = null;
    this.pending = false;
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(el);
  }

  width() {
    return Math.max(280, Math.floor((this.el.clientWidth - 16) / (this.el.clientWidth > 900 ? 2 : 1)));
  }

  create() {
    const width = this.width();
    const axis = (label, values) => ({ label, stroke: "#4a5568", grid: { stroke: "#edf0f5" }, ticks: { stroke: "#edf0f5" }, values });
    const xAxis = axis("epoch");
    const x = { time: false, range: (u, min, max) => [0, Math.max(this.epochs, max ?? 1)] };
    this.charts = {
      loss: new uPlot(
        {
          title: "Loss",
          width,
          height: 260,
          scales: { x },
          axes: [xAxis, axis("cross-entropy")],
          series: [
            { label: "epoch", value: (u, v) => (v == null ? "—" : v.toFixed(2)) },
            { label: "running loss", stroke: COLORS.running, width: 1.5, spanGaps: true, points: { show: false } },
            { label: "train loss (epoch)", stroke: COLORS.trainLoss, width: 2, spanGaps: true, points: { show: true, size: 7 } },
          ],
        },
        [[], [], []],
        this.lossBox,
      ),
      acc: new uPlot(
        {
          title: "Accuracy",
          width,
          height: 260,
          scales: {
            x,
            y: { range: (u, min, max) => [Math.max(0, Math.min(0.9, (min ?? 0) - 0.05)), 1] },
          },
          axes: [xAxis, axis("accuracy", (u, ticks) => ticks.map((t) => `${(100 * t).toFixed(1)}%`))],
          series: [
            { label: "epoch" },
            { label: "train", stroke: COLORS.trainAcc, width: 2, points: { show: true, size: 7 }, value: (u, v) => (v == null ? "—" : `${(100 * v).toFixed(2)} %`) },
            { label: this.evalLabel, stroke: COLORS.evalAcc, width: 2, points: { show: true, size: 7 }, value: (u, v) => (v == null ? "—" : `${(100 * v).toFixed(2)} %`) },
          ],
        },
        [[], [], []],
        this.accBox,
      ),
    };
  }

  resize() {
    if (!this.charts) return;
    const width = this.width();
    for (const chart of Object.values(this.charts)) chart.setSize({ width, height: 260 });
  }

  /** A progress object (JobProgress): adds a running-loss point while training. */
  addProgress(p) {
    if (!p || p.stage !== "training" || p.loss == null || !p.batches_total || !p.epoch) return;
    const x = p.epoch - 1 + p.batches_done / p.batches_total;
    const key = x.toFixed(6);
    const row = this.lossRows.get(key) || { x };
    row.running = p.loss;
    this.lossRows.set(key, row);
    this.schedule();
  }

  /** An EpochMetrics object. */
  addEpoch(m) {
    const key = Number(m.epoch).toFixed(6);
    const row = this.lossRows.get(key) || { x: m.epoch };
    row.train = m.train_loss;
    this.lossRows.set(key, row);
    this.accRows.set(m.epoch, { x: m.epoch, train: m.train_accuracy, eval: m.test_accuracy ?? m.val_accuracy ?? null });
    this.schedule();
  }

  /** Points drawn, over both charts (read by the browser test through data-points). */
  points() {
    let n = 0;
    for (const r of this.lossRows.values()) n += (r.running != null) + (r.train != null);
    for (const r of this.accRows.values()) n += (r.train != null) + (r.eval != null);
    return n;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    if (!this.charts) this.create();
    const loss = sortedRows(this.lossRows);
    const acc = sortedRows(this.accRows);
    this.charts.loss.setData([loss.map((r) => r.x), loss.map((r) => r.running ?? null), loss.map((r) => r.train ?? null)]);
    this.charts.acc.setData([acc.map((r) => r.x), acc.map((r) => r.train ?? null), acc.map((r) => r.eval ?? null)]);
    this.el.dataset.points = String(this.points());
  }

  destroy() {
    this.observer.disconnect();
    if (this.charts) for (const chart of Object.values(this.charts)) chart.destroy();
  }
}
