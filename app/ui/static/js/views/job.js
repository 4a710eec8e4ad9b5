// One job: status, live progress and curves from GET /jobs/{id}/events (polling GET /jobs/{id}
// where the server has no event stream), per-epoch metrics, cancel.

import { FINAL_STATUSES, api, hasEndpoint } from "../api.js";
import { Curves } from "../curves.js";
import { badge, duration, errorBox, fill, h, headRow, num, percent, progressFraction, when } from "../dom.js";
import { followEvents } from "../sse.js";

// the split a task evaluates on after every epoch (the others: test)
const EVAL_SPLIT = { hymenoptera_resnet18: "val", custom_resnet18: "val" };

function progressText(p, status) {
  if (!p) return status;
  const parts = [p.stage || status];
  if (p.stage === "training" && p.epochs) parts.push(`epoch ${p.epoch}/${p.epochs}`);
  if (p.batches_total) parts.push(`batch ${p.batches_done}/${p.batches_total}`);
  if (p.images_total) parts.push(`images ${p.images_done ?? 0}/${p.images_total}`);
  if (p.features_total) parts.push(`features ${p.features_done ?? 0}/${p.features_total}`);
  if (p.loss != null) parts.push(`loss ${num(p.loss, 4)}`);
  if (p.images_per_s) parts.push(`${Math.round(p.images_per_s).toLocaleString("en")} images/s`);
  return parts.join(" · ");
}

export function render(root, { id }) {
  let stopped = false;
  let stream = null;
  let timer = null;
  let curves = null;
  let job = null;
  const epochs = new Map();

  const title = h("h1", {}, "Job ", h("span", { class: "mono" }, id.slice(0, 8)));
  const statusSlot = h("span", { id: "job-status" });
  const cancelButton = h("button", { id: "cancel-job", class: "danger", type: "button", hidden: true }, "Cancel");
  const facts = h("dl", { class: "facts" });
  const progressLabel = h("div", { id: "job-progress", class: "progress-label" });
  const progressBar = h("div", { class: "bar big" }, h("span"));
  const errorSlot = h("div");
  const liveState = h("span", { id: "live-state", class: "muted" });
  const curvesBox = h("div", { id: "curves", class: "curves", dataset: { points: "0" } });
  const epochsBody = h("tbody");
  const hyperBox = h("div");

  fill(
    root,
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", id),
    h("div", { class: "title-row" }, h("div", { class: "title-group" }, title, statusSlot), cancelButton),
    errorSlot,
    h("section", { class: "card" }, progressLabel, progressBar, facts),
    h("section", { class: "card" }, h("div", { class: "section-head" }, h("h2", {}, "Curves"), liveState), curvesBox),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Epochs"),
      h(
        "table",
        { class: "table", id: "epochs-table" },
        headRow(["epoch", "lr", "train loss", "train accuracy", "eval accuracy", "duration", "images/s"]),
        epochsBody,
      ),
    ),
    h("section", { class: "card" }, h("h2", {}, "Hyperparameters"), hyperBox),
  );

  function showStatus(status, error, modelId) {
    fill(statusSlot, badge(status));
    statusSlot.dataset.status = status;
    cancelButton.hidden = FINAL_STATUSES.has(status);
    fill(errorSlot, error ? h("div", { class: "error", id: "job-error" }, error) : null);
    if (job) {
      job.status = status;
      if (modelId) job.model_id = modelId;
      if (error !== undefined) job.error = error;
      showFacts();
    }
    if (FINAL_STATUSES.has(status)) {
      progressBar.firstChild.style.width = status === "succeeded" ? "100%" : progressBar.firstChild.style.width;
      progressLabel.textContent = status;
    }
  }

  function showProgress(p) {
    if (job && FINAL_STATUSES.has(job.status)) return;
    progressLabel.textContent = progressText(p, job?.status);
    progressBar.firstChild.style.width = `${Math.max(0, Math.min(1, progressFraction(p))) * 100}%`;
    curves.addProgress(p);
  }

  function addEpoch(m) {
    if (epochs.has(m.epoch)) return;
    epochs.set(m.epoch, m);
    curves.addEpoch(m);
    fill(
      epochsBody,
      [...epochs.values()]
        .sort((a, b) => a.epoch - b.epoch)
        .map((e) =>
          h(
            "tr",
            {},
            h("td", { class: "num" }, e.epoch),
            h("td", { class: "num" }, num(e.lr, 3)),
            h("td", { class: "num" }, num(e.train_loss, 4)),
            h("td", { class: "num" }, percent(e.train_accuracy, 2)),
            h("td", { class: "num" }, percent(e.test_accuracy ?? e.val_accuracy, 2)),
            h("td", { class: "num" }, duration(e.duration_s)),
            h("td", { class: "num" }, Math.round(e.images_per_s).toLocaleString("en")),
          ),
        ),
    );
  }

  function showFacts() {
    const rows = [
      ["task", job.task],
      ["created", when(job.created_at)],
      ["started", when(job.started_at)],
      ["finished", when(job.finished_at)],
      ["device", job.device || "—"],
      ["worker", job.worker || "—"],
      ["attempts", job.attempts ?? "—"],
      ["model", job.model_id ? h("a", { id: "job-model", href: `#/models/${job.model_id}` }, job.model_id) : "—"],
    ];
    fill(facts, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function showJob(record) {
    job = record;
    showFacts();
    showStatus(job.status, job.error, job.model_id);
    if (!FINAL_STATUSES.has(job.status)) showProgress(job.progress);
    const hp = Object.entries(job.hyperparameters || {});
    fill(
      hyperBox,
      hp.length
        ? h("table", { class: "table compact" }, h("tbody", {}, hp.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, JSON.stringify(v))))))
        : h("p", { class: "muted" }, "defaults"),
    );
  }

  async function poll() {
    try {
      const record = await api(`/jobs/${id}`);
      if (stopped) return;
      showJob(record);
      for (const m of record.metrics || []) addEpoch(m);
      if (FINAL_STATUSES.has(record.status)) return;
    } catch (error) {
      if (stopped) return;
      fill(errorSlot, errorBox(error));
    }
    timer = setTimeout(poll, 1000);
  }

  function onEvent(event) {
    if (stopped) return;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (event.event === "progress") showProgress(data);
    else if (event.event === "epoch") addEpoch(data);
    else if (event.event === "status") {
      showStatus(data.status, data.error, data.model_id);
      // Started/finished times, device, worker: read the record again on each change of status.
      api(`/jobs/${id}`)
        .then((record) => {
          if (stopped) return;
          job = { ...record, status: data.status };
          showFacts();
        })
        .catch(() => {});
    }
  }

  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    try {
      const record = await api(`/jobs/${id}/cancel`, { method: "POST" });
      showStatus(record.status, record.error, record.model_id);
      if (record.cancel_requested && record.status === "running") progressLabel.textContent = "cancel requested…";
    } catch (error) {
      fill(errorSlot, errorBox(error));
    } finally {
      cancelButton.disabled = false;
    }
  });

  (async () => {
    try {
      const record = await api(`/jobs/${id}`);
      if (stopped) return;
      curves = new Curves(curvesBox, EVAL_SPLIT[record.task] || "test", record.hyperparameters?.epochs || record.progress?.epochs || 1);
      curves.draw();
      showJob(record);
      if (await hasEndpoint("get", "/jobs/{job_id}/events")) {
        stream = followEvents(`/jobs/${id}/events`, {
          onEvent,
          isFinal: (event) => event.event === "status" && FINAL_STATUSES.has(JSON.parse(event.data).status),
          onState: (state, error) => {
            liveState.textContent = { open: "live", reconnecting: "reconnecting…", closed: "" }[state] ?? state;
            liveState.dataset.state = state;
            if (error && state === "closed") fill(errorSlot, errorBox(error));
          },
        });
      } else {
        liveState.textContent = "polling (this server has no event stream)";
        for (const m of record.metrics || []) addEpoch(m);
        if (!FINAL_STATUSES.has(record.status)) timer = setTimeout(poll, 1000);
      }
    } catch (error) {
      if (!stopped) fill(root, h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs")), errorBox(error));
    }
  })();

  return () => {
    stopped = true;
    clearTimeout(timer);
    stream?.close();
    curves?.destroy();
  };
}
