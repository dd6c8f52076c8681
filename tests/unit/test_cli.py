import subprocess
import sys

import pytest
import yaml

from segclip.cli import COMMANDS, main


def test_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "segclip.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in result.stdout


def test_config_prints_the_resolved_profile(capsys):
    assert main(["config", "--profile", "tiny", "model.num_centers=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["num_centers"] == 5
    assert printed["profile"] == "tiny"


def test_bad_override_exits_2_naming_the_field(capsys):
    assert main(["config", "loss.kl_form=wrong"]) == 2
    assert "loss.kl_form: Input should be 'reference' or 'plain'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["demo", "--steps", "12", "--batch-size", "8", "--output", str(tmp_path)]) == 0
    assert "loss" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").is_file()
