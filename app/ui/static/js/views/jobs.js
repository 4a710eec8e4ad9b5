// The job list, refreshed every 2 s while it is shown.

import { api } from "../api.js";
import { badge, errorBox, evalAccuracy, fill, h, headRow, percent, progressFraction, shortId, when } from "../dom.js";
import { jobForms } from "./train.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

function progressCell(job) {
  const p = job.progress || {};
  const done = job.metrics?.length ?? 0;
  if (job.status !== "running") return done ? `${done} epoch${done === 1 ? "" : "s"}` : "—";
  const frac = progressFraction(p);
  return h(
    "div",
    { class: "mini-progress", title: p.stage || "" },
    h("div", { class: "bar" }, h("span", { style: { width: `${Math.max(0, Math.min(1, frac)) * 100}%` } })),
    h("small", {}, p.stage === "training" ? `epoch ${p.epoch}/${p.epochs}` : p.stage || ""),
  );
}

export function render(root) {
  let timer = null;
  let stopped = false;
  let generation = 0; // a change of filter starts a new refresh loop; older loops stop
  const status = h("select", { id: "jobs-status", "aria-label": "status" }, STATUSES.map((s) => h("option", { value: s }, s || "any status")));
  const task = h("select", { id: "jobs-task", "aria-label": "task" }, h("option", { value: "" }, "any task"));
  // every task the API trains (from its OpenAPI document), uploaded-dataset ones included
  jobForms()
    .then((forms) => task.append(...forms.map((form) => h("option", { value: form.task }, form.task))))
    .catch(() => {});
  const summary = h("span", { class: "muted" });
  const body = h("div", {});
  fill(
    root,
    h("div", { class: "title-row" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/train" }, "New job")),
    h("div", { class: "filters" }, status, task, summary),
    body,
  );

  async function refresh(loop = generation) {
    const query = new URLSearchParams({ limit: "50" });
    if (status.value) query.set("status", status.value);
    if (task.value) query.set("task", task.value);
    try {
      const page = await api(`/jobs?${query}`);
      if (stopped || loop !== generation) return;
      summary.textContent = `${page.data.length} of ${page.count}`;
      if (!page.data.length) {
        fill(body, h("p", { class: "empty" }, "No jobs yet. ", h("a", { href: "#/train" }, "Train a model"), "."));
      } else {
        fill(
          body,
          h(
            "table",
            { class: "table", id: "jobs-table" },
            headRow(["job", "task", "status", "progress", "accuracy", "created", "model"]),
            h(
              "tbody",
              {},
              page.data.map((job) =>
                h(
                  "tr",
                  { dataset: { job: job.id, status: job.status } },
                  h("td", { class: "mono" }, h("a", { href: `#/jobs/${job.id}` }, shortId(job.id))),
                  h("td", {}, job.task),
                  h("td", {}, badge(job.status)),
                  h("td", {}, progressCell(job)),
                  h("td", { class: "num" }, percent(evalAccuracy(job.metrics?.at(-1)))),
                  h("td", {}, when(job.created_at)),
                  h("td", { class: "mono" }, job.model_id ? h("a", { href: `#/models/${job.model_id}` }, job.model_id) : "—"),
                ),
              ),
            ),
          ),
        );
      }
    } catch (error) {
      if (stopped || loop !== generation) return;
      fill(body, errorBox(error));
    }
    timer = setTimeout(() => refresh(loop), 2000);
  }

  for (const select of [status, task])
    select.addEventListener("change", () => {
      clearTimeout(timer);
      refresh(++generation);
    });
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
