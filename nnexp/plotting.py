"""Plotting with plotly, for every kind: heatmaps and line plots with titles, axis
labels and token labels, written as HTML (and PNG).

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

from pathlib import Path

import plotly.graph_objects as go

from .console import note

_png_state = {"checked": False, "available": False}


def token_label(token: str) -> str:
    """A token as a tick label: visible whitespace, no line breaks."""
    text = token.replace("\n", "\\n")
    return text if text.strip() else repr(text)


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
) -> go.Figure:
    z = [[None if v != v else v for v in row] for row in values.tolist()]  # NaN -> gap
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(x_labels))),
            y=list(range(len(y_labels))),
            colorscale="RdBu",
            reversescale=True,  # positive = red, negative = blue
            zmid=zmid,
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate=f"{y_title}: %{{customdata[0]}}<br>{x_title}: %{{customdata[1]}}<br>value: %{{z:.3f}}<extra></extra>",
            customdata=[[[y, x] for x in x_labels] for y in y_labels],
        )
    )
    fig.update_layout(
        title={"text": title, "font": {"size": 16}},
        xaxis={"title": {"text": x_title}, "tickmode": "array", "tickvals": list(range(len(x_labels))), "ticktext": x_labels},
        yaxis={"title": {"text": y_title}, "tickmode": "array", "tickvals": list(range(len(y_labels))), "ticktext": y_labels, "autorange": "reversed"},
        width=max(760, 260 + 42 * len(x_labels)),
        height=max(480, 200 + 18 * len(y_labels)),
        margin={"t": 130},
        template="plotly_white",
    )
    return fig


def line_plot(
    x_labels: list[str],
    series: list[dict],
    *,
    title: str,
    x_title: str,
    y_title: str,
) -> go.Figure:
    """Lines over labelled x positions. Each series: {"name", "values", and optionally
    "faint" (a thin grey line, e.g. one prompt under a mean), "hover" (text per point)}."""
    fig = go.Figure()
    x = list(range(len(x_labels)))
    for item in series:
        faint = item.get("faint", False)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[None if v != v else v for v in item["values"]],
                name=item["name"],
                mode="lines" if faint else "lines+markers",
                line={"width": 1, "color": "rgba(120,120,120,0.35)"} if faint else {"width": 2},
                showlegend=not faint or item.get("legend", False),
                customdata=[[label, extra] for label, extra in zip(x_labels, item.get("hover") or [""] * len(x))],
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
    """Write each figure to `<path>.html`, and `<path>.png` when a renderer is available."""
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
    roles = record.info.get("roles") or {}
    out: dict[int, str] = {}
    for role, word in roles.items():
        positions = [p for p, token in enumerate(record.tokens) if token.strip() and token.strip() == word.strip()]
        for k, position in enumerate(positions):
            out[position] = role if len(positions) == 1 else f"{role}{k + 1}"
    return out


def shorten(text: str, limit: int = 90) -> str:
    """`text` cut to `limit` characters with an ellipsis, for titles."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
