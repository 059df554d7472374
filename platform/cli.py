"""The `stageflow` command: validate, run and watch multi-stage post-training studies."""

from __future__ import annotations

import argparse
import sys

from stageflow.platform.study_file import StudyError

EXIT_BAD_INPUT = 2

DESCRIPTION = """\
stageflow runs multi-stage LLM post-training studies on Ray: every ordering of the
study's stages x hyper-parameters x seeds is a trial; every study, trial and stage
is an MLflow run.

examples:
  stageflow validate studies/quickstart.yaml
  stageflow run studies/quickstart.yaml seeds=[0,1] stages.inst.lr=3e-4
  stageflow ui runs/quickstart
"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="stageflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in [
        ("validate", "check a study file (and overrides) without running anything"),
        ("run", "run a study: an embedded local Ray, or the cluster at RAY_ADDRESS"),
    ]:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("study", help="the study YAML file")
        sub.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="dotted overrides, e.g. stages.math.lr=1e-4",
        )
    ui = commands.add_parser(
        "ui",
        help="serve the MLflow UI of a study on 127.0.0.1",
        description="serve the MLflow UI of a study's store",
    )
    ui.add_argument("study_dir", help="the study's storage directory (holds mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except StudyError as err:
        print(f"stageflow: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_validate(args: argparse.Namespace) -> int:
    from stageflow.platform.expand import expand
    from stageflow.platform.validate import load_and_validate

    spec = load_and_validate(args.study, args.overrides)
    trials = expand(spec)
    print(f"{args.study}: valid — {len({t.path for t in trials})} orderings, {len(trials)} trials")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stageflow.platform.report import trials_table
    from stageflow.platform.runner import run_study
    from stageflow.platform.tracking import default_tracking_uri
    from stageflow.platform.validate import default_storage_dir, load_and_validate

    spec = load_and_validate(args.study, args.overrides)
    results = run_study(spec, args.study)
    storage = default_storage_dir(spec).absolute()
    print("\n" + trials_table(results) + "\n")
    print(f"study dir:  {storage}")
    print(f"MLflow:     {spec.tracking.uri or default_tracking_uri(storage)}")
    print(f"UI:         stageflow ui {default_storage_dir(spec)}   (or: make ui)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stageflow.platform.tracking import default_tracking_uri, serve_ui

    store = Path(args.study_dir) / "mlflow.db"
    if not store.is_file():
        raise StudyError(
            args.study_dir,
            "study_dir",
            "no mlflow.db here; expected a study's storage directory (run the study first)",
        )
    return serve_ui(default_tracking_uri(args.study_dir), args.host, args.port)


COMMANDS = {"validate": cmd_validate, "run": cmd_run, "ui": cmd_ui}

if __name__ == "__main__":
    sys.exit(main())
