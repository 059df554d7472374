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
  stageflow status runs/quickstart
  stageflow resume runs/quickstart          # after an interruption
  stageflow report runs/quickstart
  stageflow submit studies/quickstart.yaml --address http://HEAD:8265
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
    for name, help_text in [
        ("resume", "continue an interrupted study: finished trials and prefixes are kept"),
        ("status", "trials of a study with their progress"),
        ("report", "the per-ordering table of a study's finished trials"),
    ]:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("study_dir", help="the study's storage directory (holds study.yaml)")
    submit = commands.add_parser(
        "submit",
        help="submit a study to a Ray cluster as a Ray job",
        description="validate locally, then submit `stageflow run` as a Ray job with this directory as its working dir",
    )
    submit.add_argument("study", help="the study YAML file (inside the current directory)")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    submit.add_argument(
        "--address", required=True, help="the cluster's job server, e.g. http://HEAD:8265"
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
    from stageflow.platform.validate import load_and_validate

    spec = load_and_validate(args.study, args.overrides)
    return run_and_summarise(spec, args.study, resume=False)


def cmd_resume(args: argparse.Namespace) -> int:
    spec, source = load_study_dir(args.study_dir)
    return run_and_summarise(spec, source, resume=True)


def run_and_summarise(spec, source: str, resume: bool) -> int:
    from stageflow.platform.expand import expand
    from stageflow.platform.report import trials_table
    from stageflow.platform.runner import run_study
    from stageflow.platform.tracking import default_tracking_uri
    from stageflow.platform.validate import default_storage_dir

    results = run_study(spec, source, resume=resume)
    storage = default_storage_dir(spec).absolute()
    print("\n" + trials_table(results) + "\n")
    report = storage / "report" / "report.md"
    if spec.unlearning and report.is_file():
        print(report_summary(report) + "\n")
        print(f"report:     {report} (and report.html)")
    print(f"study dir:  {storage}")
    print(f"MLflow:     {spec.tracking.uri or default_tracking_uri(storage)}")
    print(f"UI:         stageflow ui {storage}   (or: make ui)")
    return 0 if len(results) == len(expand(spec)) else 1


def report_summary(report) -> str:
    """The report's first table: each score's spread across orderings against seed noise."""
    return "\n".join(report.read_text().split("## ")[1].splitlines()[1:]).strip()


def load_study_dir(study_dir: str):
    """The resolved spec a study directory was run with (validated again)."""
    from pathlib import Path

    from stageflow.platform.runner import STUDY_FILE
    from stageflow.platform.validate import load_and_validate

    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise StudyError(
            study_dir,
            "study_dir",
            f"no {STUDY_FILE} here; expected the storage directory of a study that was run",
        )
    return load_and_validate(path), str(path)


def cmd_status(args: argparse.Namespace) -> int:
    from stageflow.platform.report import format_table
    from stageflow.platform.status import trial_progress

    spec, _ = load_study_dir(args.study_dir)
    rows = trial_progress(spec)
    print(format_table(["trial", "ordering", "seed", "progress"], rows))
    done = sum(1 for r in rows if r[3] == "done")
    print(f"\n{done} of {len(rows)} trials done")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stageflow.platform.expand import expand
    from stageflow.platform.report import trials_table
    from stageflow.platform.runner import read_results, write_analysis

    spec, _ = load_study_dir(args.study_dir)
    storage, trials = Path(args.study_dir).absolute(), expand(spec)
    print(trials_table(read_results(storage, trials)))
    if spec.unlearning:
        _, files = write_analysis(spec, storage, trials)
        print("\n" + files["report.md"].read_text().split("## Figures")[0].strip())
        print(f"\nreport: {files['report.html']}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from stageflow.platform.submit import submit_study
    from stageflow.platform.validate import load_and_validate

    spec = load_and_validate(args.study, args.overrides)
    job_id = submit_study(args.address, args.study, args.overrides, spec)
    print(f"submitted {args.study} as Ray job {job_id}")
    print(f"follow it:  ray job logs --address {args.address} --follow {job_id}")
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


COMMANDS = {
    "validate": cmd_validate,
    "run": cmd_run,
    "resume": cmd_resume,
    "status": cmd_status,
    "report": cmd_report,
    "submit": cmd_submit,
    "ui": cmd_ui,
}

if __name__ == "__main__":
    sys.exit(main())
