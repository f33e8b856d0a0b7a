"""The run's report (report.html, `nnexp report`), drawn by a real headless Chromium;
the notebook views (`_repr_html_`, `figure()`, `to_pandas` / `to_xarray`), executed in
a real kernel; and the command that reproduces a run."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

import nnexp
from nnexp.cli import _experiment_params, build_parser, main
from nnexp.experiment import find_experiment
from nnexp.report import build_report, reproduce_command
from nnexp_experiments.ioi_patching import IOIPatching

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
N_EXAMPLES = 4


@pytest.fixture(scope="module")
def run(gpt2_tiny, tmp_path_factory):
    """A finished run with figures (PNG rendering off: it is not what is tested here)."""
    from nnexp import plotting

    out = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(plotting._png_state, "checked", True)
        patch.setitem(plotting._png_state, "available", False)
        return nnexp.run(IOIPatching(dataset="classic", sites=("resid_post", "head_out")), gpt2_tiny, out=out,
                         limit=N_EXAMPLES)


class _Scripts(HTMLParser):
    """Counts script elements, and the text of those with an id."""

    def __init__(self):
        super().__init__()
        self.opened = self.closed = 0
        self.by_id: dict[str, str] = {}
        self._id = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.opened += 1
            self._id = dict(attrs).get("id")

    def handle_endtag(self, tag):
        if tag == "script":
            self.closed += 1
            self._id = None

    def handle_data(self, data):
        if self._id:
            self.by_id[self._id] = self.by_id.get(self._id, "") + data


def test_every_run_writes_its_report(run):
    page = (run.path / "report.html").read_text()
    spec = run.spec
    for text in ("ioi-patching", "tiny-gpt2", "resid_post", "head_out", "logit_diff", spec["run_id"],
                 "built-in set of ioi-patching", "examples stored", "nnsight", spec["run"]["versions"]["torch"],
                 "computing (s)", "95% percentile bootstrap", "largest effect (resid_post)",
                 "nnexp run ioi-patching --set", "--set dataset=classic --limit 4", "n_layers 3"):
        assert text in page, text
    assert set(spec["run"]["timings"]) >= {"load_model_s", "compute_s", "figures_s", "total_s", "finished"}
    assert spec["run"]["timings"]["examples_computed"] == N_EXAMPLES
    # the summary table holds every summary row, with its interval
    summary = run.summary()
    assert f"all {len(summary)} rows" in page
    # dataset figures and one set of per-example figures per example
    declared = int(re.search(r'id="dataset-figures" data-expected="(\d+)"', page).group(1))
    assert declared == len([name for name in run.figures() if not name.startswith("example-")]) > 0
    scripts = _Scripts()
    scripts.feed(page)
    assert scripts.opened == scripts.closed
    for record in run:
        figures = json.loads(scripts.by_id[f"example-data-{record.index}"])
        assert [name for name, _ in figures] == ["resid_post", "head_out"]
        assert figures[0][1]["layout"]["xaxis"]["ticktext"] == record.tokens
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:200]) == 1  # plotly.js embedded once


def test_report_escapes_text_and_leaves_out_secrets(run, tmp_path):
    results = nnexp.load_results(run.path)
    results.records[0].info["clean"] = "<script>alert('x')</script> & </b>"
    results.spec["run"]["backend"] = {"kind": "remote", "host": "https://ndif.example", "api_key": "SECRET-123"}
    page = build_report(results)
    assert "SECRET-123" not in page and "api_key" not in page and "https://ndif.example" in page
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;/b&gt;" in page  # the example chooser
    scripts = _Scripts()
    scripts.feed(page)
    assert scripts.opened == scripts.closed  # no text ended a script early
    # the figure JSON still holds the text as it was (its title quotes the prompt)
    title = json.loads(scripts.by_id["example-data-0"])[0][1]["layout"]["title"]["text"]
    assert "<script>alert('x')</script> & </b>" in title


def test_report_shows_every_parameter_and_no_credential(run):
    from nnexp.report import _without_secrets

    page = build_report(nnexp.load_results(run.path))
    for name in run.spec["experiment"]["params"]:
        assert f">{name}<" in page, name
    # whole credential names go; parameters that merely contain "token" or "key" stay
    kept = _without_secrets({"multi_token": "skip", "key": [3], "tokens": 5, "api_key": "x", "NDIF_API_KEY": "x",
                             "hf_token": "x", "password": "x", "auth": {"user": "x"}})
    assert kept == {"multi_token": "skip", "key": [3], "tokens": 5}


def test_report_command(run, tmp_path, capsys):
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(run.path), "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert 'id="example-chooser"' in out.read_text()
    # a shorter per-example section says how to get every example
    assert main(["report", str(run.path), "-o", str(out), "--examples", "2", "--quiet"]) == 0
    page = out.read_text()
    assert re.findall(r'id="example-data-(\d+)"', page) == ["0", "1"]
    assert f"The first 2 of the {N_EXAMPLES} examples are here" in page and f"--examples {N_EXAMPLES}" in page
    assert main(["report", str(tmp_path)]) == 2
    assert "not an nnexp results directory" in capsys.readouterr().err


def test_a_run_without_figures_has_a_report_without_them(gpt2_tiny, tmp_path):
    results = nnexp.run(IOIPatching(dataset="classic"), gpt2_tiny, out=tmp_path / "run", limit=2, figures=False)
    page = (results.path / "report.html").read_text()
    from plotly.offline import get_plotlyjs

    assert "Figures were not drawn" in page and "largest effect" in page
    assert get_plotlyjs()[:200] not in page and len(page) < 200_000  # no plotly.js without figures


@pytest.mark.fast
def test_the_command_reproduces_the_parameters():
    """Parsed back by the command line, the command makes the same experiment."""
    experiment = IOIPatching(sites=("resid_post", "head_out"), layers=(0, -1), metric="prob", n_examples=16,
                             skip_shared_prefix=False, ci=0.9)
    spec = {"experiment": experiment.spec(),
            "model": {"name": "gemma3-270m", "source": {"kind": "alias", "alias": "gemma3-270m"}, "dtype": "bfloat16"},
            "run": {"limit": 8}}
    command = reproduce_command(spec)
    assert command.startswith("nnexp run ioi-patching --model gemma3-270m --dtype bfloat16 ")
    args = build_parser().parse_args(__import__("shlex").split(command)[1:])
    assert (args.model, args.dtype, args.limit) == ("gemma3-270m", "bfloat16", 8)
    cls = find_experiment(args.experiment)
    rebuilt = cls.from_params(_experiment_params(cls, args))
    assert rebuilt == experiment


def _png_is_not_blank(data: bytes) -> bool:
    """Whether a PNG's pixels vary (a blank page compresses to one repeated value)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            chunks.append(data[at + 8:at + 8 + length])
        at += 12 + length
    pixels = zlib.decompress(b"".join(chunks))
    return len(set(pixels[::7])) > 50


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt install chromium)")
def test_a_browser_draws_every_figure_of_the_report(run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    errors: list[str] = []
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                       else route.continue_())  # no network: everything it needs is in the file
            started = time.monotonic()
            page.goto((run.path / "report.html").as_uri(), wait_until="load")
            page.wait_for_selector("body[data-drawn='true']", timeout=30_000)
            drawn_after = time.monotonic() - started
            expected = int(page.get_attribute("#dataset-figures", "data-expected"))
            assert page.locator("#dataset-figures .js-plotly-plot").count() == expected
            assert page.locator("#dataset-figures .main-svg").count() >= expected
            assert page.locator("#dataset-figures .gtitle").count() == expected  # every figure has its title
            # choose the last example: its figures replace the first's
            page.select_option("#example-chooser", str(N_EXAMPLES - 1))
            page.wait_for_function("document.querySelectorAll('#example-figures .main-svg').length >= 2")
            assert page.locator("#example-figures .js-plotly-plot").count() == 2
            ticks = page.locator("#example-figures .js-plotly-plot").first.locator(".xtick text").all_text_contents()
            assert [t.strip() for t in ticks] == [t.strip() for t in run[N_EXAMPLES - 1].tokens]  # token labels
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert _png_is_not_blank(shot.read_bytes())
    assert drawn_after < 10, drawn_after


def test_notebook_views_in_a_kernel(tmp_path):
    """A small notebook, executed end to end by a Jupyter kernel on a random model."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    cells = [
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import nnexp\nfrom nnexp_experiments.ioi_patching import IOIPatching\nfrom tests.helpers import tiny_model\n"
        f"results = nnexp.run(IOIPatching(dataset='classic'), tiny_model('gpt2'), out={str(tmp_path / 'run')!r}, "
        "limit=2, figures=False)",
        "results",
        "results[0]",
        "results[0]['resid_post']",
        "results.figure('mean-roles-resid_post')",
        "results[1].figure('resid_post')",
        "frame = results[0]['resid_post'].to_pandas()\nprint(frame.shape, frame.index.names)",
        "try:\n    import xarray\nexcept ImportError:\n    print('no xarray')\nelse:\n"
        "    array = results[0]['resid_post'].to_xarray()\n    print(array.dims, array.sizes['layer'])",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [cell.outputs for cell in notebook.cells]
    for out in outputs:
        assert not [o for o in out if o.output_type == "error"], out

    def html_of(k):
        return next(o for o in outputs[k] if o.output_type == "execute_result")["data"]["text/html"]

    assert "<b>Results</b>" in html_of(1) and "ioi-patching" in html_of(1) and "largest effect" in html_of(1)
    assert "<b>ExampleRecord</b> 0" in html_of(2) and "When John and Mary" in html_of(2)
    assert "<b>LabelledTensor</b>(layer=3, position=" in html_of(3) and "<table" in html_of(3)
    for k, title in ((4, "per layer and role"), (5, "per layer and position")):
        data = next(o for o in outputs[k] if o.output_type in ("execute_result", "display_data"))["data"]
        figure = data.get("application/vnd.plotly.v1+json")
        assert figure is not None, sorted(data)
        assert title in figure["layout"]["title"]["text"]
    n_tokens = len(nnexp.load_results(tmp_path / "run")[0].tokens)
    assert outputs[6][0]["text"].strip() == f"({3 * n_tokens},) ['layer', 'position']"
    printed = outputs[7][0]["text"].strip()
    assert printed == "no xarray" or printed == "('layer', 'position') 3"


def test_a_users_own_figure_files_land_in_the_run_and_nowhere_else(run, monkeypatch):
    """A user's figures() that writes files of its own still writes them into the run's
    figures folder; drawing one example's figures (for the report, a notebook) does not
    overwrite them with figures of that example alone."""
    from nnexp import plotting
    from nnexp.figure_set import example_figures
    from nnexp.runner import draw_figures
    from nnexp.store import RunDirectory

    class OwnFigures(IOIPatching):
        def figures(self, results, out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            own = out_dir / "own.html"
            own.write_text(f"<p>{len(results)} examples</p>")
            return super().figures(results, out_dir) + [own]

    monkeypatch.setitem(plotting._png_state, "checked", True)
    monkeypatch.setitem(plotting._png_state, "available", False)
    experiment = OwnFigures(dataset="classic", sites=("resid_post", "head_out"))
    drawn: dict = {}
    written = draw_figures(experiment, run, RunDirectory(run.path), drawn)
    own = run.path / "figures" / "own.html"
    assert own in written and own.read_text() == f"<p>{N_EXAMPLES} examples</p>"
    assert run.path / "figures" / "mean-roles-resid_post.html" in written and "mean-roles-resid_post" in drawn
    assert set(example_figures(experiment, run, [run[1]])[1]) == {"resid_post", "head_out"}
    assert own.read_text() == f"<p>{N_EXAMPLES} examples</p>"


def test_a_report_that_fails_does_not_fail_the_run(gpt2_tiny, tmp_path, monkeypatch):
    import nnexp.report

    def broken(*args, **kwargs):
        raise ValueError("a figure that cannot be drawn")

    monkeypatch.setattr(nnexp.report, "build_report", broken)
    with pytest.warns(RuntimeWarning, match="could not write the run's report .*a figure that cannot be drawn.*nnexp report"):
        results = nnexp.run(IOIPatching(dataset="classic"), gpt2_tiny, out=tmp_path / "run", limit=1, figures=False)
    assert len(results) == 1 and not (tmp_path / "run" / "report.html").exists()
