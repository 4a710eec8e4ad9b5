// Predict: drop images onto the page (or choose files); each shows the image and top-k bars.

import { api } from "../api.js";
import { errorBox, fill, h, percent } from "../dom.js";
import { jobForms } from "./train.js";

/** Tasks that /predict can choose by name: those not trained on an uploaded dataset (the POST
 * /jobs variants without a `dataset` field; models of uploads are chosen by dataset or model). */
async function tasks() {
  try {
    return (await jobForms()).filter((form) => !form.needsDataset).map((form) => form.task);
  } catch {}
  return ["mnist_lenet5", "cifar10_dense", "hymenoptera_resnet18"];
}

function bars(result) {
  return h(
    "ol",
    { class: "bars" },
    result.predictions.map((p, i) =>
      h(
        "li",
        { class: i === 0 ? "first" : "" },
        h("span", { class: "label" }, p.label),
        h("span", { class: "bar" }, h("span", { style: { width: `${Math.max(0.5, 100 * p.probability)}%` } })),
        h("span", { class: "prob" }, percent(p.probability, 1)),
      ),
    ),
  );
}

export function render(root, params) {
  let stopped = false;
  const urls = [];
  const target = h("select", { id: "predict-target", "aria-label": "model" });
  const topK = h("input", { id: "predict-top-k", type: "number", min: 1, max: 100, value: params.top_k || 5, "aria-label": "top k" });
  const invert = h("select", { id: "predict-invert", "aria-label": "invert" }, ["auto", "true", "false"].map((v) => h("option", { value: v }, v)));
  const fileInput = h("input", { type: "file", accept: "image/*", multiple: true, hidden: true, id: "predict-file" });
  const drop = h(
    "div",
    { class: "drop", id: "drop", tabindex: 0, role: "button" },
    h("strong", {}, "Drop images here"),
    h("span", { class: "muted" }, "or click to choose files · PNG, JPEG, GIF, TIFF, WebP…"),
    fileInput,
  );
  const results = h("div", { class: "results", id: "predict-results" });
  fill(
    root,
    h("h1", {}, "Predict"),
    h(
      "div",
      { class: "card predict-controls" },
      h("label", {}, "model ", target),
      h("label", {}, "top k ", topK),
      h("label", { title: "MNIST only: invert to white-on-black; auto inverts when the border is light" }, "invert ", invert),
    ),
    drop,
    results,
  );

  (async () => {
    const taskNames = await tasks();
    let models = [];
    let listed = false;
    try {
      models = (await api("/models?valid=true&limit=200")).data;
      listed = models.length < 200;
    } catch (error) {
      results.prepend(errorBox(error));
    }
    // uploaded datasets that have models (a model's name is its dataset's id), by their upload names
    const uploads = [...new Set(models.filter((m) => m.name && m.name !== m.task).map((m) => m.name))];
    const names = new Map();
    if (uploads.length)
      try {
        for (const d of (await api("/datasets?limit=200")).data) names.set(d.id, d.name);
      } catch {}
    if (stopped) return;
    fill(
      target,
      // by task (or uploaded dataset): its `production` model when that alias is set, else its
      // newest, as /predict does
      h(
        "optgroup",
        { label: "by task: its production model, else the newest" },
        taskNames.map((t) => h("option", { value: `task:${t}` }, `${t} (production, else newest)`)),
      ),
      uploads.length
        ? h(
            "optgroup",
            { label: "by uploaded dataset: its production model, else the newest" },
            uploads.map((id) => h("option", { value: `dataset:${id}` }, `${names.get(id) ?? "dataset"} · ${id.slice(0, 8)}… (production, else newest)`)),
          )
        : null,
      models.length ? h("optgroup", { label: "a specific model" }, models.map((m) => h("option", { value: `model:${m.id}` }, `${m.id}${m.aliases?.length ? ` [${m.aliases.join(", ")}]` : ""}`))) : null,
    );
    const offered = models.some((m) => m.id === params.model);
    if (params.model && listed && !offered)
      results.prepend(errorBox(new Error(`model ${params.model} no longer exists or failed verification: choose a task or another model above`)));
    if (params.model && (offered || !listed)) target.value = `model:${params.model}`;
    else if (params.task) target.value = `task:${params.task}`;
    else if (params.dataset) target.value = `dataset:${params.dataset}`;
    // the newest model's task, or its uploaded dataset
    else if (models[0]) target.value = taskNames.includes(models[0].task) ? `task:${models[0].task}` : `dataset:${models[0].name}`;
  })();

  async function classify(file) {
    const url = URL.createObjectURL(file);
    urls.push(url);
    const output = h("div", { class: "prediction-output" }, h("p", { class: "muted" }, "classifying…"));
    // A file the browser cannot show (not an image, or a TIFF) gets a plain box, not a broken icon.
    const noPreview = (event) => event.target.replaceWith(h("div", { class: "preview no-preview muted small" }, "no preview"));
    const preview = h("img", { src: url, alt: file.name, class: "preview", onerror: noPreview });
    const card = h("div", { class: "card prediction" }, preview, h("div", {}, h("div", { class: "file-name mono" }, file.name), output));
    results.prepend(card);
    if (!target.value) {
      fill(output, errorBox(new Error("no model to use yet: choose a task or a model above")));
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    const [kind, value] = target.value.split(/:(.*)/s);
    form.append({ model: "model_id", dataset: "dataset" }[kind] ?? "task", value);
    form.append("top_k", topK.value || "5");
    form.append("invert", invert.value);
    try {
      const result = await api("/predict", { method: "POST", form });
      if (stopped) return;
      card.dataset.label = result.predictions[0]?.label ?? "";
      fill(
        output,
        bars(result),
        h("p", { class: "muted small" }, "model ", h("a", { href: `#/models/${result.model_id}` }, result.model_id), result.inverted ? " · inverted to white-on-black" : "", result.image ? ` · ${result.image.width}×${result.image.height} ${result.image.mode}` : ""),
      );
    } catch (error) {
      card.dataset.error = String(error.status ?? "");
      fill(output, errorBox(error));
    }
  }

  function take(files) {
    for (const file of files) classify(file);
  }

  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && fileInput.click());
  fileInput.addEventListener("change", () => take([...fileInput.files]));
  const over = (e) => {
    e.preventDefault();
    drop.classList.add("over");
  };
  const leave = () => drop.classList.remove("over");
  const dropped = (e) => {
    e.preventDefault();
    leave();
    take([...(e.dataTransfer?.files || [])]);
  };
  // The whole page is the drop target while this view is shown.
  window.addEventListener("dragover", over);
  window.addEventListener("dragleave", leave);
  window.addEventListener("drop", dropped);

  return () => {
    stopped = true;
    window.removeEventListener("dragover", over);
    window.removeEventListener("dragleave", leave);
    window.removeEventListener("drop", dropped);
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
