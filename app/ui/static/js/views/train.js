// Submit a training job. The tasks and their fields come from the server's OpenAPI document (the
// POST /jobs body is a union keyed by `task`, each with its hyperparameters schema), so the form
// always matches the API. Fields start at their defaults; only changed fields are sent, and the
// API's 422 is shown next to the field it names.

import { ApiError, api, formatDetail, openapi, resolveRef } from "../api.js";
import { errorBox, fill, h } from "../dom.js";

const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;

/** [{task, description, fields: [{name, schema, nullable, type, default, enum}]}] from OpenAPI. */
export async function jobForms() {
  const doc = await openapi();
  const body = doc.paths["/jobs"].post.requestBody.content["application/json"].schema;
  const root = resolveRef(doc, body);
  const mapping = root.discriminator?.mapping || {};
  const variants = Object.keys(mapping).length
    ? Object.entries(mapping).map(([task, ref]) => [task, resolveRef(doc, { $ref: ref })])
    : (root.oneOf || root.anyOf || [root]).map((v) => {
        const s = resolveRef(doc, v);
        return [s.properties.task.const ?? s.properties.task.enum?.[0], s];
      });
  return variants.map(([task, schema]) => {
    const hp = resolveRef(doc, schema.properties.hyperparameters);
    const fields = Object.entries(hp.properties || {}).map(([name, prop]) => {
      const options = prop.anyOf || [prop];
      const concrete = options.find((o) => o.type !== "null") || prop;
      return {
        name,
        title: prop.title || name,
        description: prop.description || "",
        nullable: options.some((o) => o.type === "null"),
        type: concrete.type,
        enum: concrete.enum,
        minimum: concrete.minimum ?? concrete.exclusiveMinimum,
        maximum: concrete.maximum ?? concrete.exclusiveMaximum,
        exclusiveMinimum: concrete.exclusiveMinimum !== undefined,
        exclusiveMaximum: concrete.exclusiveMaximum !== undefined,
        default: "default" in prop ? prop.default : null,
      };
    });
    return { task, description: schema.description || "", fields, needsDataset: "dataset" in (schema.properties || {}) };
  });
}

function bounds(f) {
  if (f.minimum === undefined && f.maximum === undefined) return "";
  const lo = f.minimum === undefined ? "" : `${f.minimum} ${f.exclusiveMinimum ? "<" : "≤"} `;
  const hi = f.maximum === undefined ? "" : ` ${f.exclusiveMaximum ? "<" : "≤"} ${f.maximum}`;
  return `${lo}${f.name}${hi}`;
}

function defaultText(f) {
  return f.default === null || f.default === undefined ? "" : String(f.default);
}

/** The value to send for a field's text, or undefined to leave the field out (= its default). */
function valueOf(f, text) {
  text = text.trim();
  if (text === defaultText(f)) return undefined;
  if (text === "") return f.nullable ? null : undefined;
  if ((f.type === "integer" || f.type === "number") && NUMBER.test(text)) return Number(text);
  if (f.type === "boolean" && (text === "true" || text === "false")) return text === "true";
  return text; // the API says what is wrong with it
}

export function render(root, params) {
  let stopped = false;
  const formBox = h("div");
  fill(root, h("h1", {}, "Train a model"), formBox);

  (async () => {
    let forms;
    try {
      forms = await jobForms();
    } catch (error) {
      fill(formBox, errorBox(error));
      return;
    }
    if (stopped) return;
    const select = h(
      "select",
      { id: "train-task", name: "task" },
      forms.map((f) => h("option", { value: f.task }, f.task)),
    );
    if (params.task && forms.some((f) => f.task === params.task)) select.value = params.task;
    const about = h("p", { class: "muted", id: "task-description" });
    const fieldsBox = h("div", { class: "fields" });
    const datasetBox = h("div");
    const formError = h("div", { id: "form-error" });
    const submit = h("button", { type: "submit", id: "submit-job", class: "primary" }, "Start training");
    const reset = h("button", { type: "button" }, "Reset to defaults");
    const form = h(
      "form",
      { class: "card job-form", id: "job-form", novalidate: true },
      h("div", { class: "field" }, h("label", { for: "train-task" }, "task"), select, about),
      datasetBox,
      fieldsBox,
      formError,
      h("div", { class: "actions" }, submit, reset, h("span", { class: "muted" }, "Fields start at the task's defaults; only changed ones are sent.")),
    );
    fill(formBox, form);

    let current = null;
    const inputs = new Map();
    const errors = new Map();
    let datasetSelect = null;
    let datasetError = null;

    // A task on an uploaded dataset (custom_resnet18): choose one of the ready uploads.
    async function buildDataset() {
      datasetSelect = null;
      fill(datasetBox);
      if (!current.needsDataset) return;
      datasetError = h("div", { class: "field-error", id: "err-dataset", role: "alert" });
      datasetSelect = h("select", { id: "train-dataset", name: "dataset" });
      fill(
        datasetBox,
        h(
          "div",
          { class: "field" },
          h("label", { for: "train-dataset" }, "dataset"),
          datasetSelect,
          h("small", { class: "hint" }, "An uploaded dataset that is ready (POST /datasets; see the README)."),
          datasetError,
        ),
      );
      try {
        const page = await api("/datasets?limit=200");
        const ready = (page.data || []).filter((d) => !d.builtin && d.status === "ready");
        fill(
          datasetSelect,
          ready.length
            ? ready.map((d) => h("option", { value: d.id }, `${d.name || d.id} (${(d.classes || []).length} classes)`))
            : h("option", { value: "" }, "no ready uploaded dataset: upload one first"),
        );
        if (params.dataset && ready.some((d) => d.id === params.dataset)) datasetSelect.value = params.dataset;
      } catch (error) {
        datasetError.textContent = error.message || String(error);
      }
    }

    function build() {
      current = forms.find((f) => f.task === select.value);
      about.textContent = current.description;
      inputs.clear();
      errors.clear();
      fill(formError);
      buildDataset();
      fill(
        fieldsBox,
        current.fields.map((f) => {
          const id = `hp-${f.name}`;
          const choices = f.enum || (f.type === "boolean" ? [true, false] : null);
          const input = choices
            ? h("select", { id, name: f.name }, choices.map((v) => h("option", { value: String(v) }, String(v))))
            : h("input", {
                id,
                name: f.name,
                type: "text",
                inputmode: f.type === "integer" ? "numeric" : f.type === "number" ? "decimal" : undefined,
                placeholder: f.nullable && f.default == null ? "none" : undefined,
                autocomplete: "off",
                spellcheck: "false",
              });
          input.value = defaultText(f);
          const error = h("div", { class: "field-error", id: `err-${f.name}`, role: "alert" });
          inputs.set(f.name, input);
          errors.set(f.name, error);
          input.addEventListener("input", () => {
            error.textContent = "";
            input.classList.remove("invalid");
          });
          const hint = [f.description, bounds(f), `default: ${f.default === null ? "none" : f.default}`].filter(Boolean).join(" · ");
          return h("div", { class: "field" }, h("label", { for: id }, f.name), input, h("small", { class: "hint" }, hint), error);
        }),
      );
    }

    function hyperparameters() {
      const values = {};
      for (const f of current.fields) {
        const value = valueOf(f, inputs.get(f.name).value);
        if (value !== undefined) values[f.name] = value;
      }
      return values;
    }

    function showErrors(error) {
      const general = [];
      if (error instanceof ApiError && error.status === 422 && Array.isArray(error.detail)) {
        for (const item of error.detail) {
          const loc = item.loc || [];
          const at = loc.indexOf("hyperparameters");
          const name = at >= 0 ? loc[at + 1] : undefined;
          if (name !== undefined && errors.has(String(name))) {
            errors.get(String(name)).textContent = item.msg;
            inputs.get(String(name)).classList.add("invalid");
          } else if (datasetError && loc.includes("dataset")) {
            datasetError.textContent = item.msg;
          } else general.push(formatDetail([item]));
        }
      } else general.push(error.message || String(error));
      fill(formError, general.length ? h("div", { class: "error" }, general.join("; ")) : null);
    }

    select.addEventListener("change", build);
    reset.addEventListener("click", build);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      for (const [name, el] of errors) {
        el.textContent = "";
        inputs.get(name).classList.remove("invalid");
      }
      fill(formError);
      submit.disabled = true;
      try {
        const body = { task: current.task, hyperparameters: hyperparameters() };
        if (datasetSelect) body.dataset = datasetSelect.value;
        if (datasetError) datasetError.textContent = "";
        const job = await api("/jobs", { method: "POST", json: body });
        location.hash = `#/jobs/${job.id}`;
      } catch (error) {
        showErrors(error);
      } finally {
        submit.disabled = false;
      }
    });
    build();
  })();

  return () => {
    stopped = true;
  };
}
