"""The installed `segclip` command: the library's commands plus the pipeline's.

Pipeline commands run Prefect flows (a temporary local API unless PREFECT_API_URL
is set); `status` and `ui` only read the workdir.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import NoReturn

from flows.temporary_api import start_temporary_api
from pipelines.registry import STAGE_HELP, STAGE_NAMES, get_stage
from segclip.cli import COMMANDS, Command, add_config_arguments
from segclip.cli import main as run_command
from segclip.config import load_config
from segclip.manifest import load_result
from segclip.sweep import SweepRecord, is_axis, plan_sweep, sweep_members, sweep_table

UI_PROBE_INTERVAL_S, UI_PROBE_TIMEOUT_S, UI_STOP_TIMEOUT_S = 0.5, 2.0, 10.0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} lists a seed twice")
    return seeds


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
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=[],
        metavar="S,S,...",
        help="one run per train.seed (a sweep: ingest and superpixels once, the results as "
        "mean ± std); an override with a list of values (train.lr_new=[1e-3,2e-3]) adds a grid",
    )


def _load_flows(stage_names: tuple[str, ...]) -> None:
    """Import the flows and the stages they run while Prefect's temporary API boots (unless a
    server is configured); returns once the API answers."""
    api_ready = start_temporary_api()
    import flows.pipeline  # noqa: F401

    for name in stage_names:
        get_stage(name)
    api_ready()


def _print_results(evaluated: str) -> None:
    from pipelines.evaluate import report

    print(f"\n{report(load_result(evaluated))}")


def _run_command(args: argparse.Namespace) -> int:
    if args.seeds or any(is_axis(override) for override in args.overrides):
        return _sweep_command(args)
    config = load_config(args.profile, args.overrides)  # invalid settings fail before Prefect
    _load_flows(STAGE_NAMES)
    from flows.pipeline import pipeline_flow

    outputs = pipeline_flow(profile=args.profile, overrides=args.overrides, force=args.force)
    for stage, folder in outputs.items():
        print(f"{stage:12s} {folder}")
    _print_results(outputs["evaluate"])
    print(f"\nbrowse the runs: segclip ui runtime.workdir={config.runtime.workdir}")
    return 0


def _sweep_command(args: argparse.Namespace) -> int:
    fixed, axes = plan_sweep(args.overrides, seeds=args.seeds)
    members = sweep_members(axes)
    # Invalid settings fail before Prefect; the members share the workdir the sweep runs in.
    configs = [load_config(args.profile, [*fixed, *member.overrides]) for member in members]
    _load_flows(STAGE_NAMES)
    from flows.sweep import sweep_flow

    folder = sweep_flow(
        profile=args.profile, overrides=args.overrides, seeds=args.seeds, force=args.force
    )
    record = SweepRecord.read(folder)
    axes_text = "; ".join(f"{a.field}: {', '.join(map(str, a.values))}" for a in axes)
    print(f"\nsweep {folder}: {len(members)} runs over {axes_text}")
    print(f"mean ± standard deviation (runs)\n{sweep_table(record.groups)}")
    print(f"\nbrowse the runs: segclip ui runtime.workdir={configs[0].runtime.workdir}")
    return 0


def _stage_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "demo")
    parser.add_argument("--force", action="store_true", help="rerun even if finished")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _stage_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="evaluate this checkpoint (ours, the released .bin) or a named CLIP "
        "(open_clip:ViT-B-16:openai, for the training-free methods) instead of this "
        "configuration's training output; no ingest or training runs",
    )


def _stage_command(stage: str):
    def run(args: argparse.Namespace) -> int:
        overrides = list(args.overrides)
        if getattr(args, "checkpoint", None):
            overrides.append(f"eval.checkpoint={args.checkpoint}")
        load_config(args.profile, overrides)  # invalid settings fail before Prefect
        _load_flows((stage,))
        from flows.pipeline import stage_flow

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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=UI_PROBE_TIMEOUT_S) as response:
            return response.status == 200
    except OSError:
        return False


def _ui_command(args: argparse.Namespace) -> int:
    """MLflow's UI for the configuration's store on 127.0.0.1; prints the project's runs page
    (mIoU and loss columns) once the server answers. A tracking server is not served again:
    its runs page is printed."""
    from segclip.tracking import (
        experiment_id,
        runs_page_url,
        save_runs_view,
        tracking_client,
        tracking_uri,
    )

    config = load_config(args.profile, args.overrides)
    uri = tracking_uri(config)
    client = tracking_client(config)
    experiment = experiment_id(client, config)
    view = save_runs_view(client, experiment)
    if uri.startswith(("http://", "https://")):
        print(f"runs: {runs_page_url(uri, experiment, view)}")
        return 0
    ui = f"http://127.0.0.1:{args.port}"
    print(f"starting the MLflow UI for {uri} on {ui}", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    # One worker and no job runner (MLflow's GenAI jobs: judges, trace roll-ups): a UI for one
    # user starts in a quarter of the time, with 2 processes instead of 10.
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        while server.poll() is None and not _answers(f"{ui}/health"):
            time.sleep(UI_PROBE_INTERVAL_S)
        if server.poll() is None:
            print(f"runs: {runs_page_url(ui, experiment, view)} (Ctrl-C to stop)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=UI_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()


PIPELINE_COMMANDS: dict[str, Command] = {
    "run": Command(
        f"the whole pipeline: {', '.join(STAGE_NAMES)} (finished stages reused)",
        _pipeline_arguments,
        _run_command,
    ),
    "sweep": Command(
        "the whole pipeline over several seeds (--seeds) and/or a grid of settings "
        "(section.field=[a,b]): shared stages once, results as mean ± std per config",
        _pipeline_arguments,
        _sweep_command,
    ),
    **{
        name: Command(
            text,
            _evaluate_arguments if name == "evaluate" else _stage_arguments,
            _stage_command(name),
        )
        for name, text in STAGE_HELP.items()
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


def entry_point() -> NoReturn:
    """The installed `segclip`: `main`, then its exit without the interpreter's teardown.

    Once a command has run, freeing the modules it loaded (torch, Prefect, MLflow, Ray) took
    Python about 3.5 s on 2 cores. The exit handlers (Prefect's temporary API, Ray, logging)
    still run first, after the threads a normal exit would wait for."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what the interpreter runs at exit; os._exit skips it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
