// One model: its facts, training metrics, and the evaluation on the held-out split (confusion
// matrix, per-class scores, the most confident mistakes with their images).

import { api, apiImageUrl, openapi } from "../api.js";
import { bytes, duration, errorBox, evalAccuracy, fill, h, headRow, num, percent, when } from "../dom.js";
import { finalMetrics } from "./models.js";

async function imageEndpoint() {
  const doc = await openapi();
  return Object.keys(doc.paths || {}).some((p) => /^\/datasets\/\{[^}]+\}\/images\/\{[^}]+\}\/\{[^}]+\}$/.test(p));
}

function confusionTable(ev) {
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      { class: "confusion", id: "confusion-matrix" },
      h("caption", {}, "rows: true class · columns: predicted class"),
      h("thead", {}, h("tr", {}, h("th", { class: "corner" }, "true \\ pred"), ev.classes.map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        ev.confusion_matrix.map((row, i) => {
          const total = row.reduce((a, b) => a + b, 0) || 1;
          return h(
            "tr",
            {},
            h("th", { scope: "row" }, ev.classes[i]),
            row.map((count, j) => {
              const share = count / total;
              const color = i === j ? `rgba(36, 86, 166, ${0.08 + 0.8 * share})` : count ? `rgba(217, 72, 43, ${0.12 + 0.85 * share})` : "transparent";
              return h(
                "td",
                { style: { background: color, color: i === j && share > 0.5 ? "#fff" : "inherit" }, title: `true ${ev.classes[i]}, predicted ${ev.classes[j]}: ${count} (${percent(share)})` },
                count,
              );
            }),
          );
        }),
      ),
    ),
  );
}

function perClassTable(ev) {
  return h(
    "table",
    { class: "table compact", id: "per-class" },
    headRow(["class", "precision", "recall", "f1", "support"]),
    h(
      "tbody",
      {},
      ev.per_class.map((c) =>
        h("tr", {}, h("td", {}, c.class), h("td", { class: "num" }, num(c.precision, 3)), h("td", { class: "num" }, num(c.recall, 3)), h("td", { class: "num" }, num(c.f1, 3)), h("td", { class: "num" }, c.support)),
      ),
    ),
  );
}

export function render(root, { id }) {
  let stopped = false;
  const urls = [];
  const controller = new AbortController();
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  fill(root, h("p", { class: "crumbs" }, h("a", { href: "#/models" }, "Models"), " / ", id), body);

  async function gallery(ev, box) {
    if (!ev.mistakes?.length) return fill(box, h("p", { class: "muted" }, "No mistakes on this split."));
    const withImages = await imageEndpoint().catch(() => false);
    const figures = ev.mistakes.map((m) => {
      const img = h("img", { alt: `true ${m.true}, predicted ${m.predicted}`, loading: "lazy" });
      const figure = h(
        "figure",
        { class: "mistake" },
        withImages ? img : h("div", { class: "no-image" }, `#${m.index}`),
        h("figcaption", {}, h("b", {}, m.predicted), ` (${percent(m.probability, 0)}) · true ${m.true}`, h("br"), h("small", { class: "muted" }, `${m.split} #${m.index}`)),
      );
      if (withImages)
        apiImageUrl(`/datasets/${encodeURIComponent(ev.dataset)}/images/${encodeURIComponent(m.split)}/${m.index}`, controller.signal)
          .then((url) => {
            if (stopped) return URL.revokeObjectURL(url);
            urls.push(url);
            img.src = url;
          })
          .catch(() => img.replaceWith(h("div", { class: "no-image" }, `#${m.index}`)));
      return figure;
    });
    fill(box, h("div", { class: "gallery", id: "mistakes" }, figures));
  }

  (async () => {
    try {
      const model = await api(`/models/${encodeURIComponent(id)}`);
      if (stopped) return;
      const final = finalMetrics(model);
      const perEpoch = Array.isArray(model.metrics?.epochs) ? model.metrics.epochs : [];
      const facts = [
        ["task", model.task || "—"],
        ...(model.name && model.name !== model.task ? [["dataset", h("a", { href: `/datasets/${model.name}`, class: "mono" }, model.name)]] : []),
        ["valid", model.valid ? "yes" : `no: ${model.error}`],
        [final.val_accuracy != null ? "val accuracy" : "test accuracy", percent(evalAccuracy(final), 2)],
        ["created", when(model.created_at)],
        ["size", bytes(model.size_bytes)],
        ["device", model.device || "—"],
        ["job", model.job_id ? h("a", { href: `#/jobs/${model.job_id}` }, model.job_id) : "—"],
        ["aliases", (model.aliases || []).join(", ") || "—"],
        ["classes", (model.classes || []).join(", ")],
      ];
      const evalBox = h("div");
      fill(
        body,
        h("div", { class: "title-row" }, h("h1", { class: "mono model-title" }, model.id), model.valid ? h("a", { class: "button primary", id: "predict-with", href: `#/predict?model=${encodeURIComponent(model.id)}` }, "Predict with this model") : null),
        h("section", { class: "card" }, h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
        h("section", { class: "card", id: "evaluation" }, h("h2", {}, "Evaluation"), evalBox),
        perEpoch.length
          ? h(
              "section",
              { class: "card" },
              h("h2", {}, "Training"),
              h(
                "table",
                { class: "table compact" },
                headRow(["epoch", "lr", "train loss", "train accuracy", "eval accuracy", "duration"]),
                h(
                  "tbody",
                  {},
                  perEpoch.map((e) => h("tr", {}, h("td", { class: "num" }, e.epoch), h("td", { class: "num" }, num(e.lr)), h("td", { class: "num" }, num(e.train_loss, 4)), h("td", { class: "num" }, percent(e.train_accuracy, 2)), h("td", { class: "num" }, percent(e.test_accuracy ?? e.val_accuracy, 2)), h("td", { class: "num" }, duration(e.duration_s)))),
                ),
              ),
            )
          : null,
        h(
          "section",
          { class: "card" },
          h("h2", {}, "Hyperparameters"),
          h("table", { class: "table compact" }, h("tbody", {}, Object.entries(model.hyperparameters || {}).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, JSON.stringify(v)))))),
        ),
      );
      const ev = model.evaluation;
      if (!ev) {
        fill(evalBox, h("p", { class: "muted", id: "evaluation-missing" }, "Evaluation not available for this model (the server stores none for it)."));
        return;
      }
      const mistakesBox = h("div");
      fill(
        evalBox,
        h("p", {}, `Accuracy on the ${ev.split} split: `, h("b", { id: "evaluation-accuracy" }, percent(ev.accuracy, 2)), ` (${ev.dataset})`),
        h("div", { class: "two-col" }, h("div", {}, h("h3", {}, "Confusion matrix"), confusionTable(ev)), h("div", {}, h("h3", {}, "Per class"), perClassTable(ev))),
        h("h3", {}, "Most confident mistakes"),
        mistakesBox,
      );
      gallery(ev, mistakesBox);
    } catch (error) {
      if (!stopped) fill(body, errorBox(error));
    }
  })();

  return () => {
    stopped = true;
    controller.abort();
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
