import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segclip.cli import main

EVERY_COMMAND = [
    "run",
    "sweep",
    "ingest",
    "superpixels",
    "train",
    "evaluate",
    "status",
    "ui",
    "config",
    "predict",
    "app",
    "convert-coco-object",
]


def test_help_lists_every_command():
    """The installed console script (flows.cli), not the library's own module, lists them all."""
    script = Path(sys.executable).parent / "segclip"
    assert script.is_file(), f"no installed segclip entry point next to {sys.executable}"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=True, env=dict(os.environ)
    )
    listed = re.findall(r"^ {4}(\S+)", result.stdout, flags=re.MULTILINE)  # one per command
    assert sorted(listed) == sorted(EVERY_COMMAND)


def test_config_prints_the_resolved_profile(capsys):
    assert main(["config", "--profile", "tiny", "model.num_centers=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["num_centers"] == 5
    assert printed["profile"] == "tiny"


def test_bad_override_exits_2_naming_the_field(capsys):
    assert main(["config", "loss.kl_form=wrong"]) == 2
    assert "loss.kl_form: Input should be 'reference' or 'plain'" in capsys.readouterr().err


def test_predict_writes_a_label_and_an_overlay_per_image(tmp_path, tiny_model, capsys):
    import numpy as np
    from PIL import Image

    from segclip.model import save_checkpoint

    checkpoint = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    image = tmp_path / "shapes.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)).save(image)
    args = [
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--classes",
        "red circle, blue square",
        "--background-threshold",
        "0.5",
        "--output",
        str(tmp_path / "out"),
        str(image),
    ]
    assert main(args) == 0
    label = np.asarray(Image.open(tmp_path / "out/shapes_label.png"))
    assert label.shape == (90, 120) and set(np.unique(label)) <= {0, 1, 2}
    overlay = Image.open(tmp_path / "out/shapes_overlay.png")
    assert overlay.width == 2 * 120 and overlay.height > 90  # image | prediction, legend below
    assert "shapes_label.png" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "nope.jpg")]) == 2
    assert "no such image: " in capsys.readouterr().err


def test_pipeline_cli_lists_every_stage_and_reports_status_without_running(tmp_path, capsys):
    from flows.cli import PIPELINE_COMMANDS
    from flows.cli import main as pipeline_main

    assert {"run", "ingest", "superpixels", "train", "evaluate", "status", "ui", "predict"} <= set(
        PIPELINE_COMMANDS
    )
    assert pipeline_main(["status", f"runtime.workdir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ingest") and "not run" in lines[0]
    assert all("waiting for the stage before it" in line for line in lines[1:]) and len(lines) == 4
    assert not list(tmp_path.iterdir())  # status creates nothing


def test_predict_refuses_an_empty_vocabulary_and_an_unknown_protocol(tmp_path, capsys):
    image = tmp_path / "x.png"
    base = ["predict", "--checkpoint", "tiny", "--output", str(tmp_path / "out"), str(image)]
    assert main([*base, "--classes", " , ,"]) == 2
    assert "--classes must name at least one class" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main([*base, "--classes", "cat", "--protocol", "segclip9"])
    assert stopped.value.code == 2
    assert "invalid choice: 'segclip9'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_runs_a_training_free_method_and_refuses_an_unknown_one(tmp_path, tiny_model):
    import numpy as np
    from PIL import Image

    from segclip.config import ConfigError
    from segclip.eval.predict import Predictor
    from segclip.model import save_checkpoint

    checkpoint = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    base = ["predict", "--checkpoint", str(checkpoint), "--output", str(out), str(image)]
    assert main([*base, "--classes", "cat,sky", "--method", "maskclip"]) == 0
    assert np.asarray(Image.open(out / "x_label.png")).shape == (40, 56)
    with pytest.raises(ConfigError, match="unknown method 'plain'"):
        Predictor(tiny_model, ["cat"], method="plain")


def test_help_and_config_load_no_framework():
    """`segclip --help` and `segclip config` answer in a fraction of a second: the stages'
    modules (torch, open_clip, Ray, MLflow) and scipy load only when a command needs them."""
    heavy = ("torch", "torchvision", "open_clip", "ray", "prefect", "mlflow", "scipy")
    probe = (
        "import contextlib, io, sys\n"
        "from flows.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['config', '--profile', 'tiny']) == 0\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"imported: {done.stdout.strip()}"


def test_torchvision_imports_after_segclip_without_torch_upfront():
    """`import segclip` defers torch; torchvision still imports (with its op schemas) later."""
    probe = (
        "import sys, segclip\n"
        "assert 'torch' not in sys.modules\n"
        "import torch, torchvision\n"
        "print(torch.ops.torchvision.nms is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_the_installed_command_exits_with_its_code_after_the_exit_handlers():
    """`entry_point` skips the interpreter's teardown: the exit code, the printed output and
    the exit handlers (Prefect's temporary API, Ray, logging) must all survive that."""
    probe = (
        "import atexit\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "from flows.cli import entry_point\n"
        "entry_point()\n"
    )
    runs = {
        profile: subprocess.run(
            [sys.executable, "-c", probe, "config", "--profile", profile],
            capture_output=True,
            text=True,
        )
        for profile in ("tiny", "huge")
    }
    assert all(run.stdout.endswith("exit handler ran\n") for run in runs.values())
    printed = yaml.safe_load(runs["tiny"].stdout.removesuffix("exit handler ran\n"))
    assert runs["tiny"].returncode == 0 and printed["profile"] == "tiny"
    assert runs["huge"].returncode == 2 and "unknown profile 'huge'" in runs["huge"].stderr
