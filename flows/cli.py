"""The installed `segclip` command: the library's commands plus the pipeline's.

Pipeline commands run Prefect flows (a temporary local API unless PREFECT_API_URL
is set); `status` and `ui` only read the workdir.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from pipelines.registry import STAGE_NAMES, STAGES
from segclip.cli import COMMANDS, Command, add_config_arguments
from segclip.cli import main as run_command
from segclip.config import load_config
from segclip.manifest import load_result


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "demo")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        choices=list(STAGE_NAMES),
        metavar="STAGE",
        help="rerun this stage even if its output is finished (repeatable); later stages follow",
    )


def _print_results(evaluated: str) -> None:
    from pipelines.evaluate import report

    print(f"\n{report(load_result(evaluated))}")


def _run_command(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline_flow

    config = load_config(args.profile, args.overrides)  # invalid settings fail before Prefect
    outputs = pipeline_flow(profile=args.profile, overrides=args.overrides, force=args.force)
    for stage, folder in outputs.items():
        print(f"{stage:12s} {folder}")
    _print_results(outputs["evaluate"])
    print(f"\nbrowse the runs: segclip ui runtime.workdir={config.runtime.workdir}")
    return 0


def _stage_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "demo")
    parser.add_argument("--force", action="store_true", help="rerun even if finished")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _stage_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="evaluate this checkpoint (ours, the released .bin) or a profile's untrained model "
        "(e.g. paper: OpenAI CLIP for the training-free methods) instead of this "
        "configuration's training output; no ingest or training runs",
    )


def _stage_command(stage: str):
    def run(args: argparse.Namespace) -> int:
        from flows.pipeline import stage_flow

        overrides = list(args.overrides)
        if getattr(args, "checkpoint", None):
            overrides.append(f"eval.checkpoint={args.checkpoint}")
        load_config(args.profile, overrides)  # invalid settings fail before Prefect
        folder = stage_flow(stage, profile=args.profile, overrides=overrides, force=args.force)
        print(folder)
        if stage == "evaluate":
            _print_results(folder)
        return 0

    return run


def _status_command(args: argparse.Namespace) -> int:
    from pipelines.registry import stage_status

    config = load_config(args.profile, args.overrides)
    for line in stage_status(config):
        print(line)
    return 0


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "demo")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")


def _ui_command(args: argparse.Namespace) -> int:
    from segclip.tracking import tracking_uri

    config = load_config(args.profile, args.overrides)
    uri = tracking_uri(config)
    print(f"MLflow UI for {uri}: http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:
        return 0


PIPELINE_COMMANDS: dict[str, Command] = {
    "run": Command(
        f"the whole pipeline: {', '.join(STAGE_NAMES)} (finished stages reused)",
        _pipeline_arguments,
        _run_command,
    ),
    **{
        stage.name: Command(
            stage.help,
            _evaluate_arguments if stage.name == "evaluate" else _stage_arguments,
            _stage_command(stage.name),
        )
        for stage in STAGES
    },
    "status": Command(
        "what each stage of this configuration holds in the workdir",
        lambda parser: add_config_arguments(parser, "demo"),
        _status_command,
    ),
    "ui": Command("serve the MLflow UI for the workdir's runs", _ui_arguments, _ui_command),
    **COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, PIPELINE_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
