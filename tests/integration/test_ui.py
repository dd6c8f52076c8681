"""`segclip ui` in a real browser: two pipeline runs in the workdir's MLflow store, the command
as a user starts it, headless Chromium on the runs page it prints."""

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import evaluate
from segclip.config import load_config
from segclip.manifest import file_ref
from segclip.model import build_model, save_checkpoint
from segclip.tracking import (
    EXPERIMENT,
    experiment_id,
    finish_pipeline_run,
    link_stage_run,
    log_metrics,
    start_pipeline_run,
    tracking_client,
    tracking_uri,
)
from tests.integration.browser import chromium, wait_for_text
from tests.integration.tiny_run import SEGCLIP

pytestmark = pytest.mark.slow

UI_START_TIMEOUT_S = 300  # MLflow's server imports for tens of seconds on a busy 2-core machine
PAGE_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30
MIOU, LOSS = "miou/segclip/segclip/demo", "loss/total"

# Every cell of the runs table by row: {row index: {column id: text}}. The grid draws a row's
# pinned and scrolling parts as separate elements with the same row index.
TABLE_CELLS = """
const rows = {};
for (const row of document.querySelectorAll('.ag-row')) {
  const cells = (rows[row.getAttribute('row-index')] ??= {});
  for (const cell of row.querySelectorAll('.ag-cell')) {
    cells[cell.getAttribute('col-id')] = cell.innerText.trim();
  }
}
return rows;
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def segclip_ui(workdir: Path, port: int, log: Path) -> Iterator[tuple[str, str]]:
    """`segclip ui` on the tiny profile in its own process group, stopped (the whole group)
    when the block ends; yields the store it serves and the runs page URL it printed once the
    server answered."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [*SEGCLIP, "ui", "--profile", "tiny", f"runtime.workdir={workdir}"]
    with log.open("w") as stream:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while not (printed := re.search(r"^runs: (\S+)", log.read_text(), re.MULTILINE)):
            assert server.poll() is None, f"segclip ui exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no runs page URL:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        store = re.search(r"MLflow UI for (\S+) on", log.read_text()).group(1)
        yield store, printed.group(1)
    finally:
        for stop in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, stop)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue


def test_the_ui_opens_on_the_runs_table_with_each_pipeline_runs_miou_and_loss(
    tmp_path, tiny_config, monkeypatch
):
    """Two pipeline runs, each a parent with a training child (its losses logged through the
    tracking functions, as rank 0 does) and a real evaluate stage; the printed page shows both
    parents with their mIoU and final loss as columns."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store beside the workdir
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_model(tiny_config.model), tmp_path / "m.safetensors")
    workdir = tmp_path / "work"
    runs = {}  # parent run name -> (mIoU, final loss)
    for overlays in (0, 1):  # two settings of the evaluate stage: two keyed outputs
        config = load_config(
            "tiny",
            [
                f"runtime.workdir={workdir}",
                "demo.benchmark_images=4",
                "demo.image_size=64",
                "eval.benchmarks=[demo]",
                "eval.methods=[segclip]",
                "eval.protocols=[segclip]",
                "eval.baselines=[]",
                f"eval.overlays={overlays}",
            ],
        )
        client = tracking_client(config)
        name = f"pipeline-overlays-{overlays}"
        lineage = start_pipeline_run(config, name, {})
        train = client.create_run(
            experiment_id(client, config), tags={**lineage.run_tags(), "segclip.stage": "train"}
        ).info.run_id
        for step in (1, 2, 3):
            log_metrics(client, train, {"loss/total": 3.0 / step + overlays}, step)
        client.set_terminated(train)
        result = evaluate.run(config, [file_ref(checkpoint)], lineage=lineage)
        stages = {"train": train, "evaluate": link_stage_run(client, result, lineage)}
        finish_pipeline_run(config, lineage, stages, failed=False)
        [row] = evaluate.read_results(result)
        runs[name] = (row["miou"], 1.0 + overlays)
    assert len(runs) == 2 and all(miou > 0.001 for miou, _ in runs.values())

    port = free_port()
    with segclip_ui(workdir, port, tmp_path / "ui.log") as (store, url):
        assert store == tracking_uri(config)  # the store the runs were logged to
        experiment = MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name(EXPERIMENT)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}")
        with chromium() as driver:
            driver.get(url)
            wait_for_text(driver, *runs, MIOU, LOSS, timeout_s=PAGE_TIMEOUT_S)
            assert "/runs" in driver.current_url  # the runs table, not GenAI's traces
            shown = {}  # run name -> (mIoU, loss) its row shows
            deadline = time.monotonic() + PAGE_TIMEOUT_S
            while set(shown) != set(runs) and time.monotonic() < deadline:
                for cells in driver.execute_script(TABLE_CELLS).values():
                    name = next((n for n in runs if any(n in v for v in cells.values())), None)
                    miou, loss = cells.get(f"metrics.`{MIOU}`"), cells.get(f"metrics.`{LOSS}`")
                    if name and miou and loss:
                        shown[name] = (float(miou), float(loss))
                time.sleep(0.5)
    assert set(shown) == set(runs), shown
    for name, (miou, loss) in runs.items():
        assert shown[name][0] == pytest.approx(miou, abs=1e-3)  # the table rounds
        assert shown[name][1] == pytest.approx(loss)  # the last step's, not the first's
