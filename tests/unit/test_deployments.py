"""prefect.yaml: every deployment names a real flow and parameters that flow accepts."""

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from flows.stages import STAGE_FLOWS, pipeline_flow
from segclip.config import SegCLIPConfig, load_config

ROOT = Path(__file__).parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_the_pipeline_and_every_stage_have_a_deployment():
    flows = {load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name for d in DEPLOYMENTS}
    assert flows == {pipeline_flow.name} | {flow.name for flow in STAGE_FLOWS.values()}
    assert all(d["work_pool"]["name"] == "segclip" for d in DEPLOYMENTS)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_parameters_are_a_resolved_profile_the_flow_accepts(deployment):
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    parameters = flow.validate_parameters(deployment["parameters"])
    assert isinstance(parameters["config"], SegCLIPConfig)
    profile = parameters["config"].profile
    # Kept equal to the profile: after changing one, paste `segclip config --profile P` here.
    assert parameters["config"] == load_config(profile), f"prefect.yaml's {profile} is stale"
