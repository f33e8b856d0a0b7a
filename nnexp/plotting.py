"""Plotting with plotly, for every kind: heatmaps and line plots with titles, axis
labels and token labels, written as HTML (and PNG).

Dataset means carry their bootstrap intervals (`nnexp.statistics`): line plots draw
them as error bars, heatmaps show them in the hover text and mark with a small grey x
each cell whose interval contains 0.

Every figure is written as HTML into one folder, with plotly.js written once beside
them (so they open offline) and as PNG when kaleido finds a Chrome or Chromium to
render with; without one, PNGs are skipped with a single note.

Token labels: the x axis of a position heatmap is numeric with the tokens as tick
text, because plotly merges repeated category labels (" to" appears twice in most
IOI prompts). For averages over a group of examples, a position whose token differs
between examples is labelled with its role (IO, S1, S2...) when the examples name
their roles, and with "*" otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import plotly.graph_objects as go

from .console import note

_png_state = {"checked": False, "available": False}
# While set (`capturing`), `write_figures` collects the figures instead of writing them:
# how the report, the notebook helpers and the runner get every kind's figures as
# objects, each kind drawing them with the code that writes its figure files.
_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("nnexp_captured_figures", default=None)


@contextlib.contextmanager
def capturing():
    """Collect the (figure, path) pairs `write_figures` is given inside the block, in a
    list, instead of writing files."""
    collected: list = []
    token = _captured.set(collected)
    try:
        yield collected
    finally:
        _captured.reset(token)


def token_label(token: str) -> str:
    """A token as a tick label: visible whitespace, no line breaks."""
    text = token.replace("\n", "\\n")
    return text if text.strip() else repr(text)


def interval_text(lower, upper, n, ci: float) -> str:
    """"95% CI [0.12, 0.40], n=24" for hover text ("" when there is no interval)."""
    if lower is None or lower != lower or upper != upper:
        return f"no interval (n={int(n)})" if n is not None else ""
    return f"{100 * ci:g}% CI [{lower:.3f}, {upper:.3f}], n={int(n)}"


def heatmap(
    values,
    *,
    title: str,
    x_title: str,
    y_title: str,
    x_labels: list[str],
    y_labels: list[str],
    colorbar_title: str,
    zmid: float | None = 0.0,
    lower=None,
    upper=None,
    n=None,
    ci: float = 0.95,
) -> go.Figure:
    """A heatmap of `values` [y, x]. With `lower`, `upper` and `n` (arrays of its shape: a
    bootstrap interval per cell, `nnexp.statistics`), the hover text shows each cell's
    interval, and cells whose interval contains 0 are marked with a small grey x."""
    z = [[None if v != v else v for v in row] for row in values.tolist()]  # NaN -> gap
    with_intervals = lower is not None and upper is not None and n is not None
    if with_intervals:
        lower, upper, n = _rows(lower), _rows(upper), _rows(n)
        intervals = [[interval_text(lo, up, k, ci) for lo, up, k in zip(*cells)] for cells in zip(lower, upper, n)]
    else:
        intervals = [["" for _ in x_labels] for _ in y_labels]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(x_labels))),
            y=list(range(len(y_labels))),
            colorscale="RdBu",
            reversescale=True,  # positive = red, negative = blue
            zmid=zmid,
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate=f"{y_title}: %{{customdata[0]}}<br>{x_title}: %{{customdata[1]}}<br>value: %{{z:.3f}}"
                          "<br>%{customdata[2]}<extra></extra>",
            customdata=[[[y, x, text] for x, text in zip(x_labels, texts)] for y, texts in zip(y_labels, intervals)],
        )
    )
    if with_intervals:
        # marked: an interval that contains 0 (the sign of the mean is not established)
        marked = [(i, j) for i, row in enumerate(lower) for j, lo in enumerate(row)
                  if lo == lo and upper[i][j] == upper[i][j] and lo <= 0 <= upper[i][j]]
        fig.add_trace(go.Scatter(
            x=[j for _, j in marked], y=[i for i, _ in marked], mode="markers", hoverinfo="skip",
            marker={"symbol": "x-thin", "size": 7, "line": {"width": 1.5, "color": "rgba(60,60,60,0.8)"}},
            name=f"x: {100 * ci:g}% interval contains 0", showlegend=True,
        ))
    fig.update_layout(
        title={"text": title, "font": {"size": 16}},
        xaxis={"title": {"text": x_title}, "tickmode": "array", "tickvals": list(range(len(x_labels))), "ticktext": x_labels},
        yaxis={"title": {"text": y_title}, "tickmode": "array", "tickvals": list(range(len(y_labels))), "ticktext": y_labels, "autorange": "reversed"},
        width=max(760, 260 + 42 * len(x_labels)),
        height=max(480, 200 + 18 * len(y_labels)),
        margin={"t": 130},
        template="plotly_white",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
    )
    return fig


def _rows(array) -> list[list[float]]:
    """A 2-d array (numpy or torch) as nested lists of floats."""
    import numpy as np

    return np.asarray(array, dtype=float).tolist()


def line_plot(
    x_labels: list[str],
    series: list[dict],
    *,
    title: str,
    x_title: str,
    y_title: str,
) -> go.Figure:
    """Lines over labelled x positions. Each series: {"name", "values", and optionally
    "faint" (a thin grey line, e.g. one prompt under a mean), "hover" (text per point),
    "lower", "upper", "n" and "ci" (a bootstrap interval per point, drawn as error bars
    and shown in the hover text)}."""
    fig = go.Figure()
    x = list(range(len(x_labels)))
    for item in series:
        faint = item.get("faint", False)
        hover = list(item.get("hover") or [""] * len(x))
        error = None
        if item.get("lower") is not None and item.get("upper") is not None:
            values, lower, upper = (_floats(item[key]) for key in ("values", "lower", "upper"))
            n = _floats(item["n"]) if item.get("n") is not None else [None] * len(x)
            ci = item.get("ci", 0.95)
            hover = [(h + "<br>" if h else "") + interval_text(lo, up, k, ci) if k is not None else h
                     for h, lo, up, k in zip(hover, lower, upper, n)]
            error = {"type": "data", "symmetric": False, "thickness": 1, "width": 3,
                     "array": [None if up != up else up - v for v, up in zip(values, upper)],
                     "arrayminus": [None if lo != lo else v - lo for v, lo in zip(values, lower)]}
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[None if v != v else v for v in item["values"]],
                name=item["name"],
                mode="lines" if faint else "lines+markers",
                line={"width": 1, "color": "rgba(120,120,120,0.35)"} if faint else {"width": 2},
                showlegend=not faint or item.get("legend", False),
                error_y=error,
                customdata=[[label, extra] for label, extra in zip(x_labels, hover)],
                hovertemplate="%{customdata[0]}: %{y:.3f}<br>%{customdata[1]}<extra>" + item["name"] + "</extra>",
            )
        )
    step = max(1, len(x_labels) // 40)  # keep tick labels legible on deep models
    fig.add_hline(y=0, line={"width": 1, "color": "black"})
    fig.update_layout(
        title={"text": title, "font": {"size": 16}},
        xaxis={"title": {"text": x_title}, "tickmode": "array", "tickvals": x[::step], "ticktext": x_labels[::step],
               "tickangle": -60},
        yaxis={"title": {"text": y_title}},
        width=max(900, 200 + 16 * len(x_labels)),
        height=560,
        margin={"t": 130},
        template="plotly_white",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
    )
    return fig


def _floats(values) -> list[float]:
    import numpy as np

    return np.asarray(values, dtype=float).ravel().tolist()


def interval_series(name: str, estimate, scale: float = 1.0) -> dict:
    """A `line_plot` series of a 1-d `nnexp.statistics.Estimate` (its mean, with error
    bars and hover text from its interval), values multiplied by `scale`."""
    return {"name": name, "values": (scale * estimate.mean).tolist(), "lower": (scale * estimate.lower).tolist(),
            "upper": (scale * estimate.upper).tolist(), "n": estimate.n.tolist(), "ci": estimate.ci}


def png_available() -> bool:
    """Whether kaleido can render PNGs here (it needs Chrome or Chromium)."""
    if not _png_state["checked"]:
        _png_state["checked"] = True
        try:
            import kaleido  # noqa: F401
            from choreographer.browsers.chromium import Chromium

            _png_state["available"] = Chromium.find_browser(skip_local=False) is not None
        except Exception:  # noqa: BLE001 - any failure to find one means no renderer
            _png_state["available"] = False
        if not _png_state["available"]:
            note(
                "PNG figures skipped: kaleido needs a Chrome or Chromium browser (apt install chromium, "
                "or plotly_get_chrome); HTML figures are written"
            )
    return _png_state["available"]


def write_figures(figures: list[tuple[go.Figure, Path]], png: bool | None = None) -> list[Path]:
    """Write each figure to `<path>.html`, and `<path>.png` when a renderer is available
    (inside `capturing()`, collect them instead and write nothing)."""
    collected = _captured.get()
    if collected is not None:
        collected.extend(figures)
        return []
    written = []
    for fig, path in figures:
        path.parent.mkdir(parents=True, exist_ok=True)
        html = path.with_suffix(".html")
        # "directory": the page loads plotly.min.js from its own folder (written once),
        # so figures open without a network and without 4 MB of JavaScript each.
        fig.write_html(str(html), include_plotlyjs="directory", full_html=True)
        written.append(html)
    if figures and (png if png is not None else png_available()):
        import plotly.io as pio

        pngs = [path.with_suffix(".png") for _, path in figures]
        try:
            pio.write_images(
                [fig for fig, _ in figures],
                [str(p) for p in pngs],
                # kaleido ignores the layout's size unless it is passed explicitly
                width=[fig.layout.width for fig, _ in figures],
                height=[fig.layout.height for fig, _ in figures],
            )
            written += pngs
        except Exception as error:  # noqa: BLE001 - a renderer failure must not lose the run
            note(f"PNG figures skipped: rendering failed ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
    return written


# -- patching figures -----------------------------------------------------------------

def group_position_labels(records) -> list[str]:
    """Tick labels for positions shared by a group of same-length examples."""
    columns = list(zip(*[record.tokens for record in records]))
    role_names = [_roles_by_position(record) for record in records]
    labels = []
    for position, tokens in enumerate(columns):
        if len(set(tokens)) == 1:
            labels.append(token_label(tokens[0]))
            continue
        roles = {names.get(position) for names in role_names}
        labels.append(f"[{roles.pop()}]" if len(roles) == 1 and None not in roles else "*")
    return labels


def _roles_by_position(record) -> dict[int, str]:
    """Position -> role label from the example's declared roles: a role mentioned once
    keeps its name ("IO"), one mentioned several times is numbered ("S1", "S2")."""
    from .roles import named_positions

    return named_positions(record.tokens, record.info.get("roles") or {})


def shorten(text: str, limit: int = 90) -> str:
    """`text` cut to `limit` characters with an ellipsis, for titles."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
