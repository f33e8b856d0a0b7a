"""A run's report: one self-contained HTML file (`report.html` in the run directory).

It says what was run (the experiment and every parameter), on which weights (the
model's name, source, dtype, quantisation, architecture) and data (file and SHA-256,
or the built-in set; examples computed, skipped and why, missing), with which library
versions and how long it took; what was found and how sure it is (the summary table
with bootstrap intervals); the dataset figures; a per-example section (choose an
example, see its figures); and the command that reproduces the run.

Built from what the run directory holds (spec.json, skipped.json, the stored examples);
no model is loaded. Figures are each kind's own (`nnexp.figure_set`). plotly.js is
embedded once, so the file opens with no network. Dataset figures are drawn as the page
loads; each example's figures are embedded as JSON and drawn when it is chosen, so a
run of many examples still opens at once. Every text from the run is escaped. Nothing
from the environment (API keys, hosts' credentials) is read; keys of the spec that
look like secrets are left out.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shlex
from pathlib import Path

from .statistics import SUMMARY_COLUMNS, top_findings

REPORT_NAME = "report.html"
# The per-example section holds the figures of this many examples by default: each adds
# its figures' data to the file (tens of kB), so a run of thousands would make a page of
# hundreds of MB. `nnexp report DIR --examples N` takes more.
MAX_EXAMPLES = 200
# The names a credential goes by. Deliberately whole names, not substrings: an
# experiment's parameters (`multi_token`, a knockout's `key` positions) must all show.
_SECRET = re.compile(r"^(.*_)?(api_?key|secret|password|passwd|credentials?|auth|auth_token|access_token|hf_token)$",
                     re.IGNORECASE)


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _script_json(value) -> str:
    """JSON text safe inside a <script> element ("</" cannot end it)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("</", "<\\/")


def _without_secrets(value):
    """`value` (spec parts) without keys that look like credentials."""
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items() if not _SECRET.search(str(k))}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


# -- the command that reproduces a run ------------------------------------------------

def _set_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def _experiment_reference(spec: dict) -> str:
    """The name `nnexp run` knows the experiment by, or its file and class."""
    from .experiment import builtin_experiments

    experiment = spec["experiment"]
    qualname = experiment["class"].partition(":")[2]
    known = builtin_experiments().get(experiment.get("name"))
    if known is not None and known.__qualname__ == qualname:
        return experiment["name"]
    if experiment.get("source_file"):
        return f"{experiment['source_file']}:{qualname}"
    return experiment["class"]


def reproduce_command(spec: dict, experiment=None) -> str:
    """`nnexp run ...` with every parameter that differs from the experiment's default,
    the model, dtype, data file, checkpoint and limit: the command that recomputes the
    run (into the same directory name, since that is a hash of the same things).
    `experiment`: the run's own object, when there is one (else rebuilt from the spec)."""
    from .experiment import experiment_from_spec

    if experiment is None:
        experiment = experiment_from_spec(spec["experiment"])
    try:
        defaults = type(experiment)()
    except Exception:  # noqa: BLE001 - an experiment without usable defaults: give every parameter
        defaults = None
    words = ["nnexp", "run", _experiment_reference(spec)]
    model = spec["model"]
    source = model["source"]
    reference = {"alias": source.get("alias"), "folder": source.get("path"), "config": source.get("path"),
                 "hub": source.get("repo_id"), "remote": source.get("from")}.get(source.get("kind"))
    if reference:
        words += ["--model", str(reference)]
    if source.get("checkpoint"):
        words += ["--checkpoint", str(source["checkpoint"].get("path", source["checkpoint"]))
                  if isinstance(source["checkpoint"], dict) else str(source["checkpoint"])]
    if model.get("dtype") not in (None, "float32", "server"):
        words += ["--dtype", model["dtype"]]
    if model.get("quantization") == "8bit":
        words.append("--load-in-8bit")
    if experiment.data:
        words += ["--data", str(experiment.data)]
    for field in dataclasses.fields(experiment):
        if field.name == "data":
            continue
        value = getattr(experiment, field.name)
        if defaults is None or value != getattr(defaults, field.name):
            words += ["--set", f"{field.name}={_set_value(value)}"]
    run = spec.get("run", {})
    if run.get("limit") is not None:
        words += ["--limit", str(run["limit"])]
    backend = (run.get("backend") or {}).get("kind")
    if backend and backend != "local":
        words += ["--backend", backend]
    return shlex.join(words)


# -- what the report says -------------------------------------------------------------

def _table(rows: list[tuple], header: tuple | None = None, cls: str = "kv") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header) if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">' + (f"<thead><tr>{head}</tr></thead>" if head else "") + f"<tbody>{body}</tbody></table>"


def _value_text(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "—" if value is None else str(value)


def _skipped(path: Path) -> tuple[list[int], str, dict]:
    """(skipped indices, why, reasons by index) from skipped.json; runs made before nnexp
    recorded a reason per example have none."""
    file = path / "skipped.json"
    if not file.is_file():
        return [], "", {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return [int(i) for i in data.get("examples", [])], str(data.get("why", "")), dict(data.get("reasons", {}))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return [], "skipped.json is unreadable", {}


def _model_rows(model: dict) -> list[tuple]:
    from .models.aliases import ALIASES

    source = model.get("source", {})
    where = {k: v for k, v in source.items() if k != "kind"}
    rows = [("name", model.get("name")), ("source", f"{source.get('kind')}: {_value_text(where)}"),
            ("dtype", model.get("dtype")), ("device", model.get("device"))]
    quantization = model.get("quantization")
    alias = ALIASES.get(source.get("alias")) if source.get("kind") == "alias" else None
    if alias is not None:
        quantization = quantization or alias.description.rpartition("; ")[2]
    rows.append(("quantisation", quantization or "none"))
    architecture = ", ".join(f"{k} {v}" for k, v in model.items()
                             if k not in ("name", "source", "dtype", "device", "quantization", "backend"))
    rows.append(("architecture", architecture))
    return rows


def _data_rows(spec: dict, results, skipped: list[int], why: str, reasons: dict) -> list[tuple]:
    data = spec.get("data", {})
    rows = []
    if data.get("kind") == "file":
        rows += [("data file", data.get("path")), ("SHA-256", data.get("sha256"))]
    else:
        rows.append(("data", f"built-in set of {data.get('experiment', spec['experiment'].get('name'))}"
                             + _builtin_detail(spec)))
    total = data.get("n_examples")
    limit = spec.get("run", {}).get("limit")
    rows.append(("examples in the data", total))
    if limit is not None:
        rows.append(("limit", f"the first {limit} (--limit)"))
    rows.append(("examples stored", len(results)))
    if skipped:
        counts: dict[str, int] = {}
        for index in skipped:
            reason = reasons.get(str(index)) or why or "not selected by the experiment"
            counts[reason] = counts.get(reason, 0) + 1
        rows.append(("skipped", "; ".join(f"{n}: {reason}" for reason, n in counts.items())))
    else:
        rows.append(("skipped", 0))
    if results.missing:
        rows.append(("missing", f"{len(results.missing)} (not computed yet, or damaged): "
                                f"{', '.join(map(str, results.missing[:20]))}"))
    return rows


def _builtin_detail(spec: dict) -> str:
    params = spec["experiment"].get("params", {})
    shown = {k: params[k] for k in ("dataset", "n_examples", "seed") if k in params}
    return f" ({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else ""


def _timing_rows(run: dict) -> list[tuple]:
    rows = [("started", run.get("created"))]
    timings = run.get("timings") or {}
    labels = {"finished": "finished", "load_model_s": "loading the model (s)", "compute_s": "computing (s)",
              "examples_computed": "examples computed by the latest command", "figures_s": "figures and summary (s)",
              "total_s": "latest command in all (s)"}
    rows += [(label, timings[key]) for key, label in labels.items() if key in timings]
    if not timings:
        rows.append(("timings", "not recorded (a run made before nnexp recorded them)"))
    return rows


def _summary_html(rows: list[dict] | None, ci: float, n_boot: int, n: int) -> str:
    if not rows:
        return "<p>This experiment reports no dataset-level numbers.</p>"
    lines = "".join(f"<li>{esc(line)}</li>" for line in top_findings(rows, limit=20))
    table_rows = [tuple(_cell(row.get(column)) for column in SUMMARY_COLUMNS) for row in rows]
    return (f"<p>Means over examples with {100 * ci:g}% percentile bootstrap intervals ({n_boot} resamples of the "
            f"{n} examples, seeded). Largest effect of each measure:</p><ul>{lines}</ul>"
            f"<details><summary>all {len(rows)} rows (summary.csv)</summary>"
            + _table(table_rows, SUMMARY_COLUMNS, cls="summary") + "</details>")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


def _example_label(record) -> str:
    info = record.info
    text = info.get("clean") or info.get("prompt") or " ".join(record.tokens)
    return f"{record.index}: {text}"[:120]


# -- the page ---------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left;
vertical-align: top; font-size: 0.9em; } table.kv td:first-child { font-weight: 600; white-space: nowrap; }
table.summary td { font-family: ui-monospace, monospace; }
pre { background: #f5f5f5; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
.cards { display: flex; flex-wrap: wrap; gap: 0 3em; } .cards section { flex: 1 1 420px; min-width: 0; }
.cards td { overflow-wrap: anywhere; } .figure { margin: 1em 0; } select { font-size: 1em; max-width: 100%; }
"""

_SCRIPT = """
function nnexpDraw(div, figure) { return Plotly.newPlot(div, figure.data, figure.layout, {responsive: false}); }
function nnexpShowExample(index) {
  const box = document.getElementById('example-figures');
  box.querySelectorAll('.js-plotly-plot').forEach(function (div) { Plotly.purge(div); });
  box.innerHTML = '';
  const source = document.getElementById('example-data-' + index);
  if (!source) { return; }
  const figures = JSON.parse(source.textContent);
  box.dataset.expected = String(figures.length);
  figures.forEach(function (item) {
    const div = document.createElement('div');
    div.className = 'figure';
    div.dataset.name = item[0];
    box.appendChild(div);
    nnexpDraw(div, item[1]);
  });
}
// Figures are drawn one at a time after the page has shown its text, so it opens at once.
function nnexpDrawAll() {
  const queue = Array.from(document.querySelectorAll('script.dataset-figure'));
  function next() {
    const source = queue.shift();
    if (!source) { document.body.dataset.drawn = 'true'; return; }
    nnexpDraw(document.getElementById(source.dataset.target), JSON.parse(source.textContent)).then(function () {
      setTimeout(next, 0);
    });
  }
  const chooser = document.getElementById('example-chooser');
  if (chooser) {
    chooser.addEventListener('change', function () { nnexpShowExample(chooser.value); });
    nnexpShowExample(chooser.value);
  }
  setTimeout(next, 0);
}
if (typeof Plotly !== 'undefined') { window.addEventListener('load', nnexpDrawAll); }
else { document.body.dataset.drawn = 'true'; }
"""


def render(results, experiment, rows: list[dict] | None, figures: dict | None, examples: dict[int, dict] | None) -> str:
    """The report's HTML. `figures`: dataset figures by name (None: not drawn);
    `examples`: {index: {name: figure}} for the per-example section."""
    from plotly.offline import get_plotlyjs

    spec = results.spec
    experiment_spec = _without_secrets(spec["experiment"])
    run = _without_secrets(spec.get("run", {}))
    skipped, why, reasons = _skipped(results.path)
    title = f"{experiment_spec.get('name') or experiment_spec['class']} on {spec['model'].get('name')}"
    parts = [f"<h1>{esc(title)}</h1>",
             f"<p>{esc(type(experiment).description)}</p>" if type(experiment).description else "",
             f"<p>Run <code>{esc(spec.get('run_id'))}</code> · <code>{esc(results.path)}</code></p>"]

    parts.append('<div class="cards"><section><h2>Experiment</h2>')
    parts.append(_table([("experiment", experiment_spec.get("name")), ("class", experiment_spec.get("class")),
                         ("source file", experiment_spec.get("source_file"))]))
    params = experiment_spec.get("params", {})
    parts.append(_table([(k, _value_text(v)) for k, v in params.items()], ("parameter", "value")))
    if "declared" in experiment_spec:
        parts.append("<details><summary>runs the experiment declares</summary><pre>"
                     f"{esc(json.dumps(experiment_spec['declared'], indent=1))}</pre></details>")

    parts.append("</section><section><h2>Model</h2>" + _table(_model_rows(_without_secrets(spec["model"]))))
    parts.append("<h2>Data</h2>" + _table(_data_rows(spec, results, skipped, why, reasons)))
    versions = run.get("versions", {})
    batching = {k: run.get(k) for k in ("examples_per_trace", "max_rows", "memory_budget") if k in run}
    parts.append("<h2>Libraries and timings</h2>"
                 + _table([(k, v or "not installed") for k, v in versions.items()], ("library", "version"))
                 + _table(_timing_rows(run) + [(k, _value_text(v)) for k, v in batching.items()]
                          + [("backend", _value_text(run.get("backend")))]) + "</section></div>")
    parts.append("<h2>Reproduce</h2><pre id=\"reproduce\">" + esc(reproduce_command(spec, experiment)) + "</pre>"
                 f"<p>or continue this run where it is: <code>nnexp resume {esc(shlex.quote(str(results.path)))}</code></p>")
    parts.append("<h2>Summary</h2>" + _summary_html(rows, experiment.ci, experiment.n_boot, len(results)))

    scripts = []
    if figures is None:
        why = "the run used --no-figures" if results.records else "no example is stored yet"
        parts.append(f"<h2>Figures</h2><p>Figures were not drawn for this report ({why}); "
                     f"<code>nnexp report {esc(shlex.quote(str(results.path)))}</code> draws them.</p>")
    else:
        parts.append(f'<h2>Dataset figures</h2><div id="dataset-figures" data-expected="{len(figures)}">')
        for k, (name, fig) in enumerate(figures.items()):
            parts.append(f'<div class="figure" id="dataset-figure-{k}" data-name="{esc(name)}"></div>')
            scripts.append(f'<script type="application/json" class="dataset-figure" data-target="dataset-figure-{k}">'
                           f"{_script_json(fig.to_json())}</script>")
        parts.append("</div>")
    if examples:
        by_index = {record.index: record for record in results.records}
        options = "".join(f'<option value="{index}">{esc(_example_label(by_index[index]))}</option>'
                          for index in examples)
        more = (f" The first {len(examples)} of the {len(results)} examples are here; <code>nnexp report "
                f"{esc(shlex.quote(str(results.path)))} --examples {len(results)}</code> includes every one."
                if len(examples) < len(results) else "")
        parts.append(f"<h2>Examples</h2><p>Choose an example to see its figures.{more}</p>"
                     f'<select id="example-chooser">{options}</select><div id="example-figures"></div>')
        for index, named in examples.items():
            payload = "[" + ",".join(f"[{json.dumps(name)},{fig.to_json()}]" for name, fig in named.items()) + "]"
            scripts.append(f'<script type="application/json" id="example-data-{index}">{_script_json(payload)}</script>')

    plotly = f"<script>{get_plotlyjs()}</script>" if figures is not None or examples else ""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
            # the text first, then plotly.js and the figures' data: the page shows before they are parsed
            + "".join(parts) + plotly + "".join(scripts) + f"<script>{_SCRIPT}</script></body></html>")


def build_report(results, *, experiment=None, rows: list[dict] | None = None, drawn: dict | None = None,
                 figures: bool = True, max_examples: int = MAX_EXAMPLES) -> str:
    """The report's HTML for loaded `results`. `rows` (summary rows) and `drawn` (figures
    by name, `figure_set.run_figures`) are reused when given, computed otherwise;
    `figures=False` leaves the figures out; the per-example section holds the first
    `max_examples` examples."""
    from .errors import NnexpError
    from .figure_set import dataset_figures, example_figures, run_figures

    experiment = experiment if experiment is not None else results.experiment()
    if rows is None and results.records:
        try:
            rows = experiment.summary_rows(results)
        except NnexpError:
            rows = None
    dataset = examples = None
    if figures and results.records:
        drawn = drawn if drawn is not None else run_figures(experiment, results)
        dataset = dataset_figures(drawn)
        shown = results.records[:max_examples]
        examples = {index: named for index, named in example_figures(experiment, results, shown, drawn).items()
                    if named} or None  # a kind may draw no per-example figures
    return render(results, experiment, rows, dataset, examples)


def write_report(results, out=None, **options) -> Path:
    """Write the report of `results` to `out` (default: report.html in the run directory)."""
    from .disk import write_atomically

    path = Path(out) if out is not None else results.path / REPORT_NAME
    write_atomically(path, build_report(results, **options).encode("utf-8"))
    return path
