"""Bad file names and the pack's HTTP surface, against a real headless ComfyUI (issue 9).

Reuses the integration module's server fixture and workflows: one server for every case here.
"""

from __future__ import annotations

import json

import pytest

from comfy_xdit.comfyui_server import COMFYUI, error_message, status_str
from test_comfyui_integration import node_of, server, shipped_workflow  # noqa: F401 (server is a fixture)

pytestmark = pytest.mark.skipif(not (COMFYUI / "main.py").exists(), reason="tools/setup.sh installs the test ComfyUI")

BAD_NAMES = ["../../etc/passwd", "../x.safetensors", "/etc/passwd", "checkpoints/../../outside.safetensors"]
# (workflow, node class, input) for every input naming a file in a model folder
FILE_INPUTS = [("flux_txt2img_parallel", "ParallelLoader", "model_name"),
               ("flux_lora_parallel", "ParallelLoraLoader", "lora_name"),
               ("flux_controlnet_parallel", "ParallelControlNetLoader", "control_net_name")]


@pytest.fixture(scope="module")
def outside_file(server):  # noqa: F811
    # A real model file just outside the model folders: what `../outside.safetensors` would reach.
    path = server.base / "outside.safetensors"
    path.write_bytes((server.base / "models" / "diffusion_models" / "tiny_flux.safetensors").read_bytes())
    return path


FOLDERS = {"model_name": "diffusion_models", "lora_name": "loras", "control_net_name": "controlnet"}
COUNTERS = ("load_count", "lora_apply_count", "controlnet_load_count", "jobs_done")


def pool_counters(server) -> list:
    return [{k: pool.get(k) for k in COUNTERS} for pool in server.get("/comfy_xdit/status")["pools"]]


@pytest.mark.parametrize("workflow,cls,field", FILE_INPUTS)
def test_file_names_leaving_the_model_folders_are_refused_and_the_server_keeps_serving(server, outside_file, workflow, cls, field):  # noqa: F811
    # ComfyUI 0.3.75 does not check a V3 combo's value when a prompt is queued: the node must.
    before = pool_counters(server)
    for bad in BAD_NAMES + [str(outside_file), "../outside.safetensors"]:
        graph = shipped_workflow(workflow)
        node_of(graph, cls)["inputs"][field] = bad
        entry = server.run(graph)
        assert status_str(entry) == "error", bad
        message = error_message(entry)
        folder = "checkpoints" if bad.startswith("checkpoints/") and cls == "ParallelLoader" else FOLDERS[field]
        assert f"{field} {bad!r}" in message and f"models/{folder} folder" in message, message
        assert "'..' or absolute paths are refused" in message, message
    # Nothing was opened or run: no load, LoRA patch, ControlNet load or job happened.
    assert pool_counters(server) == before
    entry = server.run(shipped_workflow(workflow))
    assert status_str(entry) == "success", error_message(entry)


def test_a_name_the_folder_does_not_list_is_refused_by_name(server):  # noqa: F811
    graph = shipped_workflow("flux_txt2img_parallel")
    node_of(graph, "ParallelLoader")["inputs"]["model_name"] = "missing.safetensors"
    message = error_message(server.run(graph))
    assert "model_name 'missing.safetensors' is not in ComfyUI's models/diffusion_models folder" in message, message


def test_status_route_has_no_paths_and_no_file_contents(server):  # noqa: F811
    assert status_str(server.run(shipped_workflow("flux_txt2img_parallel"))) == "success"
    text = json.dumps(server.get("/comfy_xdit/status"))
    assert "tiny_flux.safetensors" in text  # the model's file name is shown ...
    assert str(server.base) not in text and "/tmp" not in text  # ... but no folder of this machine
    for value in _strings(json.loads(text)):
        assert not value.startswith("/"), value
        assert "\x00" not in value and len(value) < 1000, value[:100]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_status_route_ignores_a_path_parameter(server):  # noqa: F811
    # A query naming a file changes nothing: the route reads no parameters.
    assert server.get("/comfy_xdit/status?path=/etc/passwd").keys() == server.get("/comfy_xdit/status").keys()
    assert "root:" not in json.dumps(server.get("/comfy_xdit/status?path=/etc/passwd"))
