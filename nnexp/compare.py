"""One experiment across models: runs of the same experiment on different models,
aligned and drawn together.

    comparison = nnexp.compare("results/ioi-patching/smollm2-135m/run-...",
                               "results/ioi-patching/gemma3-270m/run-...")
    comparison.frame      # model, measure, role, layer, head, relative_depth, mean, lower, upper, n
    comparison.peaks()    # per model and measure, where the effect peaks, with its interval
    comparison.figures()  # one figure per measure: a line per model, one panel per role
    comparison.write_html("compare.html")

Models differ in depth and tokenizer, so cells are aligned by what they mean rather
than by their numbers:

- **depth**: a layer's relative depth is layer / (n_layers - 1): 0 is the first block,
  1 the last, whatever the model's number of layers (for windowed kinds, the window's
  centre layer);
- **positions**: by role (`nnexp.roles`: IO, S1, S2, END... or ROME's token categories
  of a fact), which every kind's summary already averages by, so S2 is S2 whichever
  token number it has in each tokenizer.

The numbers are each run's summary (`Results.summary()`): means over its examples with
percentile bootstrap intervals, recomputed from the stored examples with one `ci` and
`n_boot` for all runs (the first run's unless given). Runs are comparable when they are
runs of the same experiment with the same parameters on the same data; only the model,
and what is numbered in a model's own layers and heads (`layers`, `heads`), may differ.
Anything else is refused, with one line, before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ResultsError
from .statistics import STATISTICS_PARAMS

# parameters numbered in a model's own layers and heads: they differ between models of
# different depths, and the comparison aligns layers by relative depth instead
MODEL_DEPENDENT = ("layers", "heads")
COLUMNS = ("model", "measure", "role", "layer", "head", "relative_depth", "mean", "lower", "upper", "n")


def relative_depth(layer: int, n_layers: int) -> float:
    """layer / (n_layers - 1): 0 for the first block, 1 for the last."""
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def _comparable_part(spec: dict) -> dict:
    """What must be equal for two runs to be compared: the experiment, its parameters
    except the model-dependent and summary ones, and the data."""
    from .store import identity

    ident = identity(spec)
    params = {k: v for k, v in ident["experiment"]["params"].items()
              if k not in MODEL_DEPENDENT and k not in STATISTICS_PARAMS}
    return {"name": ident["experiment"]["name"], "class": ident["experiment"]["class"], "params": params,
            "declared": ident["experiment"].get("declared"), "data": ident["data"]}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def check_comparable(specs: list[dict], paths: list[Path]) -> None:
    """Refuse, with one line, runs that are not the same experiment on different models."""
    first, where = _comparable_part(specs[0]), paths[0]
    for spec, path in zip(specs[1:], paths[1:]):
        other = _comparable_part(spec)
        if (first["name"], first["class"]) != (other["name"], other["class"]):
            raise ResultsError(
                f"cannot compare {where} ({first['name'] or first['class']}) with {path} "
                f"({other['name'] or other['class']}): they are runs of different experiments; compare runs of one "
                "experiment on different models")
        keys = sorted(set(first["params"]) | set(other["params"]))
        differ = [k for k in keys if first["params"].get(k) != other["params"].get(k)]
        if differ:
            shown = ", ".join(f"{k} ({_short(first['params'].get(k))} vs {_short(other['params'].get(k))})"
                              for k in differ)
            raise ResultsError(
                f"cannot compare {where} with {path}: their parameters differ in {shown}; only the model (and "
                f"{', '.join(MODEL_DEPENDENT)}) may differ: rerun one with the other's parameters")
        if first["declared"] != other["declared"]:
            raise ResultsError(f"cannot compare {where} with {path}: their experiments declare different runs; "
                               "compare runs of the same experiment code")
        if first["data"] != other["data"]:
            raise ResultsError(
                f"cannot compare {where} with {path}: they were made on different data ({_short(first['data'])} vs "
                f"{_short(other['data'])}); run both models on the same data")


def _text(value) -> str:
    """A cell as text; "" for a missing one (None, NaN, pandas' NA)."""
    import pandas as pd

    return "" if value is None or pd.isna(value) else str(value)


@dataclass
class Comparison:
    """Runs of one experiment on several models, aligned by relative depth and role."""

    runs: list[dict]  # per run: label, path, model, n_layers, examples
    frame: object  # pandas DataFrame of COLUMNS
    experiment: str
    ci: float
    n_boot: int
    measures: list[str] = field(default_factory=list)

    def peaks(self, by_role: bool = False):
        """Per model and measure (and role, with `by_role`), the cell of largest |mean|
        over cells of more than one example: its role, layer, head, relative depth, mean
        and interval."""
        import pandas as pd

        frame = self.frame[(self.frame["n"] > 1) & self.frame["mean"].notna()]
        roles = list(dict.fromkeys(frame["role"])) if by_role else [...]
        rows = []
        for measure in self.measures:
            for role in roles:
                for run in self.runs:
                    cells = frame[(frame["measure"] == measure) & (frame["model"] == run["label"])]
                    if role is not ...:
                        cells = cells[cells["role"].isna()] if role is None else cells[cells["role"] == role]
                    if len(cells):
                        rows.append(cells.loc[cells["mean"].abs().idxmax()])
        return pd.DataFrame(rows, columns=list(COLUMNS)).reset_index(drop=True)

    def peaks_text(self, by_role: bool = False) -> str:
        """The peak table as aligned text lines (for the terminal)."""
        peaks = self.peaks(by_role)
        header = ("measure", "model", "role", "layer", "head", "depth", f"mean [{100 * self.ci:g}% interval]", "n")
        lines = [header]
        for row in peaks.itertuples(index=False):
            lines.append((row.measure, row.model, _text(row.role), _text(row.layer), _text(row.head),
                          f"{row.relative_depth:.2f}", f"{row.mean:.3f} [{row.lower:.3f}, {row.upper:.3f}]",
                          str(row.n)))
        widths = [max(len(str(line[k])) for line in lines) for k in range(len(header))]
        return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)

    def figures(self) -> dict:
        """{measure: figure}: the mean per relative depth, one line per model with its
        intervals as error bars, one panel per role; measures per head are left out
        (a head's number means nothing across models; they are in `peaks()`)."""
        out = {}
        for measure in self.measures:
            cells = self.frame[(self.frame["measure"] == measure) & self.frame["head"].isna()
                               & self.frame["layer"].notna()]
            if len(cells):
                out[measure] = self._figure(measure, cells)
        return out

    def _figure(self, measure: str, cells):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        roles = list(dict.fromkeys(cells["role"].where(cells["role"].notna(), None)))
        columns = min(4, len(roles))
        rows = (len(roles) + columns - 1) // columns
        titles = [str(role) if role is not None else "all positions" for role in roles]
        fig = make_subplots(rows=rows, cols=columns, subplot_titles=titles, shared_yaxes=True,
                            horizontal_spacing=0.04, vertical_spacing=0.5 / max(rows, 1) if rows > 1 else 0.1)
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        for k, role in enumerate(roles):
            row, col = k // columns + 1, k % columns + 1
            at = cells[cells["role"].isna()] if role is None else cells[cells["role"] == role]
            for j, run in enumerate(self.runs):
                line = at[at["model"] == run["label"]].sort_values("relative_depth")
                if not len(line):
                    continue
                hover = [f"{run['label']}<br>layer {int(layer)} of {run['n_layers']}<br>{mean:.3f} "
                         f"[{lower:.3f}, {upper:.3f}], n={int(n)}"
                         for layer, mean, lower, upper, n in zip(line["layer"], line["mean"], line["lower"],
                                                                 line["upper"], line["n"])]
                fig.add_trace(go.Scatter(
                    x=line["relative_depth"].tolist(), y=line["mean"].tolist(), mode="lines+markers",
                    name=f"{run['label']} ({run['n_layers']} layers)", legendgroup=run["label"], showlegend=k == 0,
                    line={"color": colours[j % len(colours)], "width": 2}, marker={"size": 4},
                    error_y={"type": "data", "symmetric": False, "thickness": 1, "width": 2,
                             "array": (line["upper"] - line["mean"]).tolist(),
                             "arrayminus": (line["mean"] - line["lower"]).tolist()},
                    hovertext=hover, hoverinfo="text"), row=row, col=col)
            fig.update_xaxes(title_text="relative depth (layer / (layers - 1))", range=[-0.03, 1.03], row=row, col=col)
        for row in range(1, rows + 1):
            fig.update_yaxes(title_text=measure, row=row, col=1)
        fig.add_hline(y=0, line={"width": 1, "color": "black"})
        models = " vs ".join(run["label"] for run in self.runs)
        fig.update_layout(
            title={"text": f"{self.experiment}: {measure} across models ({models})<br><sup>mean over examples with "
                           f"{100 * self.ci:g}% bootstrap intervals, by role and relative depth</sup>",
                   "font": {"size": 16}},
            width=min(1280, max(700, 300 * columns + 100)), height=190 + 300 * rows, template="plotly_white",
            margin={"t": 120, "b": 110},
            # under the panels, clear of the title and of the panels' own titles
            legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom", "x": 0.0, "xanchor": "left"})
        return fig

    def to_html(self) -> str:
        """One self-contained page: the runs, the peak table and every figure (plotly.js
        embedded once)."""
        from plotly.offline import get_plotlyjs

        from .report import _STYLE, _table, esc

        runs = _table([(run["label"], run["n_layers"], run["examples"], str(run["path"])) for run in self.runs],
                      ("model", "layers", "examples", "run"))
        peaks = self.peaks()
        peak_rows = [(r.measure, r.model, _text(r.role), _text(r.layer), _text(r.head), f"{r.relative_depth:.2f}", f"{r.mean:.3f} [{r.lower:.3f}, {r.upper:.3f}]", int(r.n))
                     for r in peaks.itertuples(index=False)]
        figures = "".join(f'<div class="figure">{fig.to_html(include_plotlyjs=False, full_html=False)}</div>'
                          for fig in self.figures().values())
        title = f"{self.experiment} across models"
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(title)}</title><style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
                f"<h1>{esc(title)}</h1><p>Relative depth = layer / (number of layers - 1); positions aligned by "
                f"role; means over examples with {100 * self.ci:g}% percentile bootstrap intervals ({self.n_boot} "
                f"resamples).</p>{runs}<h2>Where each model's effect peaks</h2>"
                + _table(peak_rows, ("measure", "model", "role", "layer", "head", "relative depth",
                                     f"mean [{100 * self.ci:g}% interval]", "n"))
                + f"<h2>Figures</h2>{figures}</body></html>")

    def write_html(self, path) -> Path:
        from .disk import write_atomically

        path = Path(path)
        write_atomically(path, self.to_html().encode("utf-8"))
        return path

    def __repr__(self) -> str:
        models = ", ".join(f"{run['label']} ({run['n_layers']} layers)" for run in self.runs)
        return f"Comparison({self.experiment!r}: {models}; {len(self.measures)} measures)"

    def _repr_html_(self) -> str:
        from .report import esc

        return f"<p>{esc(repr(self))}</p>" + self.peaks().to_html(index=False, na_rep="")


def compare(*paths, ci: float | None = None, n_boot: int | None = None) -> Comparison:
    """Align runs of one experiment on different models (see the module docstring)."""
    import pandas as pd

    from .store import RunDirectory, load_results

    paths = [Path(p) for p in (paths[0] if len(paths) == 1 and isinstance(paths[0], (list, tuple)) else paths)]
    if len(paths) < 2:
        raise ResultsError(f"compare needs at least two run directories, got {len(paths)}")
    specs = [RunDirectory(path).read_spec() for path in paths]  # each one a run, or a one-line error
    ids = [spec["run_id"] for spec in specs]
    for k, run_id in enumerate(ids):
        if run_id in ids[:k]:
            raise ResultsError(f"{paths[k]} is the same run as {paths[ids.index(run_id)]}; give runs on different models")
    check_comparable(specs, paths)
    for spec, path in zip(specs, paths):
        if not spec["model"].get("n_layers"):
            raise ResultsError(f"{path}/spec.json does not record the model's number of layers, which relative depth "
                               "needs; rerun it with this nnexp")
    labels = [spec["model"]["name"] for spec in specs]
    labels = [f"{label} ({spec['run_id']})" if labels.count(label) > 1 else label for label, spec in zip(labels, specs)]
    first = load_results(paths[0])
    ci = ci if ci is not None else first.experiment().ci
    n_boot = n_boot if n_boot is not None else first.experiment().n_boot
    frames, runs = [], []
    for path, spec, label in zip(paths, specs, labels):
        results = first if path == paths[0] else load_results(path)
        n_layers = int(spec["model"]["n_layers"])
        frame = results.summary(ci=ci, n_boot=n_boot)
        frame = frame[frame["layer"].notna()].copy()
        frame.insert(0, "model", label)
        frame["relative_depth"] = [relative_depth(int(layer), n_layers) for layer in frame["layer"]]
        frames.append(frame)
        runs.append({"label": label, "path": results.path, "model": spec["model"]["name"], "n_layers": n_layers,
                     "examples": len(results), "indices": [record.index for record in results]})
    held = [run.pop("indices") for run in runs]
    if any(indices != held[0] for indices in held[1:]):
        from .console import note

        note("the runs hold different examples of the data (" + "; ".join(
            f"{run['label']}: {len(indices)}" for run, indices in zip(runs, held)) + ", after --limit and what each "
            "model's selection kept): their means are over different subsets")
    frame = pd.concat(frames, ignore_index=True)
    frame["role"] = frame["role"].astype(object).where(frame["role"].notna(), None)
    frame = frame[list(COLUMNS)]
    measures = list(dict.fromkeys(frame["measure"]))
    return Comparison(runs, frame, specs[0]["experiment"]["name"] or specs[0]["experiment"]["class"], ci, n_boot,
                      measures)
