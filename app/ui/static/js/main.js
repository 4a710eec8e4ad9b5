// The console: a hash router over a few views, and the API key box.

import { getKey, setKey, uiConfig } from "./api.js";
import { errorBox, fill, h } from "./dom.js";
import * as job from "./views/job.js";
import * as jobs from "./views/jobs.js";
import * as model from "./views/model.js";
import * as models from "./views/models.js";
import * as predict from "./views/predict.js";
import * as train from "./views/train.js";

const ROUTES = [
  [/^\/jobs\/([0-9a-f]{32})$/, job, "jobs", (m) => ({ id: m[1] })],
  [/^\/jobs\/?$/, jobs, "jobs"],
  [/^\/train\/?$/, train, "train"],
  [/^\/models\/([A-Za-z0-9_.-]+)$/, model, "models", (m) => ({ id: m[1] })],
  [/^\/models\/?$/, models, "models"],
  [/^\/predict\/?$/, predict, "predict"],
];

const view = document.getElementById("view");
let cleanup = null;

let authRequired = false;

function route() {
  if (authRequired && !getKey()) {
    cleanup?.();
    cleanup = null;
    fill(view, h("p", { class: "notice", id: "key-needed" }, "This server needs an API key: enter it in the box above."));
    return;
  }
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query = ""] = hash.split("?");
  const params = Object.fromEntries(new URLSearchParams(query));
  cleanup?.();
  cleanup = null;
  for (const [pattern, module, nav, extract] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
    try {
      cleanup = module.render(view, { ...params, ...(extract ? extract(match) : {}) }) || null;
    } catch (error) {
      fill(view, errorBox(error));
    }
    return;
  }
  fill(view, errorBox(new Error(`no page ${path}`)));
}

function showKeyBox(state) {
  const box = document.getElementById("key-box");
  box.hidden = false;
  document.getElementById("key-state").textContent = state;
}

function setupKeyBox() {
  const box = document.getElementById("key-box");
  const input = document.getElementById("api-key");
  input.value = getKey();
  box.addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    document.getElementById("key-state").textContent = getKey() ? "key set" : "no key";
    route();
  });
  window.addEventListener("imgclf:unauthorized", () => showKeyBox(getKey() ? "key refused" : "key needed"));
}

// Dropping a file outside a drop target must not navigate away from the console.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

setupKeyBox();
authRequired = (await uiConfig()).auth_required;
if (authRequired) showKeyBox(getKey() ? "key set" : "key needed");
window.addEventListener("hashchange", route);
if (!location.hash) history.replaceState(null, "", "#/jobs");
route();
