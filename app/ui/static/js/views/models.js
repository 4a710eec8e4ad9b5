// The checkpoints in the store.

import { api } from "../api.js";
import { bytes, errorBox, evalAccuracy, fill, h, headRow, percent, when } from "../dom.js";

export function finalMetrics(model) {
  const m = model.metrics || {};
  return m.final || (Array.isArray(m.epochs) ? m.epochs.at(-1) : null) || {};
}

export function render(root) {
  let stopped = false;
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  fill(root, h("div", { class: "title-row" }, h("h1", {}, "Models"), h("a", { class: "button", href: "#/predict" }, "Predict")), body);
  (async () => {
    try {
      const page = await api("/models?limit=200");
      if (stopped) return;
      if (!page.data.length) {
        fill(body, h("p", { class: "empty" }, "No models yet: a job that succeeds writes one. ", h("a", { href: "#/train" }, "Train a model"), "."));
        return;
      }
      fill(
        body,
        h("p", { class: "muted" }, `${page.data.length} of ${page.count}`),
        h(
          "table",
          { class: "table", id: "models-table" },
          headRow(["model", "task", "accuracy", "epochs", "aliases", "created", "size", "valid"]),
          h(
            "tbody",
            {},
            page.data.map((model) => {
              const final = finalMetrics(model);
              return h(
                "tr",
                { dataset: { model: model.id } },
                h("td", { class: "mono" }, h("a", { href: `#/models/${model.id}` }, model.id)),
                h("td", {}, model.task || "—", model.name && model.name !== model.task ? h("div", { class: "muted mono", title: "uploaded dataset" }, `dataset ${model.name.slice(0, 8)}…`) : null),
                h("td", { class: "num" }, percent(evalAccuracy(final), 2)),
                h("td", { class: "num" }, final.epoch ?? "—"),
                h("td", {}, (model.aliases || []).map((a) => h("span", { class: "tag" }, a))),
                h("td", {}, when(model.created_at)),
                h("td", { class: "num" }, bytes(model.size_bytes)),
                h("td", {}, model.valid ? h("span", { class: "badge status-succeeded" }, "valid") : h("span", { class: "badge status-failed", title: model.error || "" }, "invalid")),
              );
            }),
          ),
        ),
      );
    } catch (error) {
      if (!stopped) fill(body, errorBox(error));
    }
  })();
  return () => {
    stopped = true;
  };
}
