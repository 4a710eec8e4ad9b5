// Small DOM helpers: elements are built with h(), never from HTML strings, so API text is inert.

/** h("a", {href: "#/x", class: "y", onclick: fn}, "text", child, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "style" && typeof value === "object") Object.assign(el.style, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function percent(x, digits = 1) {
  return x == null || Number.isNaN(x) ? "—" : `${(100 * x).toFixed(digits)} %`;
}

export function num(x, digits = 3) {
  if (x == null) return "—";
  if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en");
  return Number(x).toPrecision(digits);
}

export function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
}

export function duration(seconds) {
  if (seconds == null) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return `${m} min ${Math.round(seconds - 60 * m)} s`;
}

export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "—";
}

/** The accuracy a job or model is judged by: test (CIFAR-10, MNIST) or val (hymenoptera). */
/** How far a running job is, 0..1, from its progress: the batches of its epochs while training,
 * else the images or features of the stage it is in (loading data, extracting features). */
export function progressFraction(p) {
  if (!p) return 0;
  if (p.stage === "training" && p.batches_total && p.epochs)
    return (p.epoch - 1 + p.batches_done / p.batches_total) / p.epochs;
  if (p.images_total) return (p.images_done ?? 0) / p.images_total;
  if (p.features_total) return (p.features_done ?? 0) / p.features_total;
  return 0;
}

export function evalAccuracy(metrics) {
  if (!metrics) return null;
  return metrics.test_accuracy ?? metrics.val_accuracy ?? null;
}

export function errorBox(error) {
  return h("div", { class: "error", role: "alert" }, error?.message || String(error));
}

const NUMERIC = new Set(["accuracy", "epochs", "size", "epoch", "lr", "train loss", "train accuracy", "eval accuracy", "duration", "images/s", "precision", "recall", "f1", "support"]);

/** A table head row; numeric columns are right-aligned like their cells. */
export function headRow(columns) {
  return h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: NUMERIC.has(c) ? "num" : null }, c))));
}
