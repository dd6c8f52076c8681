"""The installed `segclip` command: the library's commands plus the pipeline's.

Pipeline commands run Prefect flows (a temporary local API unless PREFECT_API_URL
is set); `status` and `ui` only read the workdir.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from segclip.cli import COMMANDS, Command, add_config_arguments
from segclip.cli import main as run_command
from segclip.config import load_config

STAGE_HELP = {
    "ingest": "download or adopt image-text pairs into webdataset shards",
    "superpixels": "add superpixel label maps to the ingested shards (Ray Data)",
    "train": "train SegCLIP on the superpixel shards (Ray Train, MLflow)",
    "evaluate": "zero-shot segmentation benchmarks of the trained model",
}


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "demo")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        choices=list(STAGE_HELP),
        metavar="STAGE",
        help="rerun this stage even if its output is finished (repeatable); later stages follow",
    )


def _run_command(args: argparse.Namespace) -> int:
    from flows.stages import pipeline_flow

    config = load_config(args.profile, args.overrides)
    outputs = pipeline_flow(config, force=args.force)
    for stage, folder in outputs.items():
        print(f"{stage:12s} {folder}")
    print(f"\nbrowse the runs: segclip ui runtime.workdir={config.runtime.workdir}")
    return 0


def _stage_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "demo")
    parser.add_argument("--force", action="store_true", help="rerun even if finished")


def _stage_command(stage: str):
    def run(args: argparse.Namespace) -> int:
        from flows.stages import STAGE_FLOWS

        config = load_config(args.profile, args.overrides)
        print(STAGE_FLOWS[stage](config, force=args.force))
        return 0

    return run


def _status_command(args: argparse.Namespace) -> int:
    from flows.stages import stage_status

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
        "the whole pipeline: ingest, superpixels, train, evaluate (finished stages reused)",
        _pipeline_arguments,
        _run_command,
    ),
    **{
        stage: Command(help, _stage_arguments, _stage_command(stage))
        for stage, help in STAGE_HELP.items()
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
