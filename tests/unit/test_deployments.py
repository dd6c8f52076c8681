"""prefect.yaml: every stage, the pipeline and the sweep have a deployment whose parameters the flow
accepts and whose profile resolves, so the Prefect UI runs the profile as it is."""

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from flows.pipeline import pipeline_flow, stage_flow
from flows.sweep import sweep_flow
from pipelines.registry import STAGE_NAMES
from segclip.config import SegCLIPConfig, load_config

ROOT = Path(__file__).parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_the_pipeline_the_sweep_and_every_stage_of_the_registry_have_a_deployment():
    flows = {load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name for d in DEPLOYMENTS}
    assert flows == {pipeline_flow.name, stage_flow.name, sweep_flow.name}
    staged = [d["parameters"]["stage"] for d in DEPLOYMENTS if "stage" in d["parameters"]]
    assert sorted(staged) == sorted(STAGE_NAMES)
    assert all(d["work_pool"]["name"] == "segclip" for d in DEPLOYMENTS)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_parameters_name_a_profile_the_flow_accepts(deployment):
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    parameters = flow.validate_parameters(deployment["parameters"])
    config = load_config(parameters["profile"], parameters["overrides"])
    assert config.profile == parameters["profile"]


def test_the_paper_recipe_is_written_once():
    """The reference recipe lives in the config defaults; the paper profile adds nothing."""
    paper = yaml.safe_load((ROOT / "segclip/configs/paper.yaml").read_text())
    assert not paper
    assert load_config("paper") == SegCLIPConfig(profile="paper")
