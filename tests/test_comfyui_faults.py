"""Faults, the errors the page shows, and a 50-prompt load, through a real headless ComfyUI (issue 9).

One server for the module, started with the fault hook armed-able (pool/faults.py: each test
writes the fault file when it wants a rank to fail) and with a secret-looking variable in its
environment that no message may show. Model files and workflows come from the integration
module.
"""

from __future__ import annotations

import json
import os
import re
import time

import psutil
import pytest
import torch

from comfy_xdit.comfyui_server import COMFYUI, ComfyServer, error_message, status_str, with_demo_conditioning
from comfy_xdit.comfyui_server import shipped_workflow as load_workflow
from comfy_xdit.pool import faults, shm
from test_comfyui_integration import CONTEXT_DIM, POOLED_DIM, node_of, pool_status, saved_latent, shipped_workflow, write_models

pytestmark = [pytest.mark.skipif(not (COMFYUI / "main.py").exists(), reason="tools/setup.sh installs the test ComfyUI"),
              pytest.mark.timeout(600)]

SECRET_NAME, SECRET = "COMFY_XDIT_TEST_API_TOKEN", "tok-4f9a2c77e1b3d5"
NOTICED_WITHIN_S = 10.0
LOADER = dict(devices="cpu,cpu", ulysses_degree=2, use_cfg_parallel=False)  # the same pool for both models
MEMORY_SLACK = 100 * 2**20  # issue 9: resident memory after prompt 50 at most 100 MB above after prompt 5


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fault") / "fault"


@pytest.fixture(scope="module")
def server(tmp_path_factory, fault_file):
    base = tmp_path_factory.mktemp("comfyui_faults")
    server = ComfyServer(base)
    write_models(base / "models")
    # A .safetensors whose header claims more bytes than the file has.
    (base / "models" / "diffusion_models" / "corrupt.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    server.start(env={faults.ENV_FAULT_FILE: str(fault_file), SECRET_NAME: SECRET})
    yield server
    server.stop()


def latent_graph(model: str, seed: int, devices: str = LOADER["devices"]) -> dict:
    """A prompt of the tiny Flux or SD3.5 model that ends in SaveLatent (no VAE: the output to compare is the latent)."""
    if model == "flux":
        graph = shipped_workflow("flux_txt2img_parallel")
    else:
        graph = with_demo_conditioning(load_workflow("sd3_txt2img_parallel"), CONTEXT_DIM, POOLED_DIM)
        node_of(graph, "ParallelLoader")["inputs"]["model_name"] = "checkpoints/tiny_sd35.safetensors"
        node_of(graph, "EmptySD3LatentImage")["inputs"].update(width=64, height=48)
    node_of(graph, "ParallelLoader")["inputs"].update({**LOADER, "devices": devices,
                                                       "ulysses_degree": 0 if devices == "cpu" else 2})
    node_of(graph, "ParallelSampler")["inputs"].update(seed=seed, steps=3)
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "ParallelSampler")
    for node_id in [k for k, n in graph.items() if n["class_type"] in ("VAELoader", "ParallelVAEDecode", "SaveImage")]:
        del graph[node_id]
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0],
                                                          "filename_prefix": f"load_{model}_{devices}_{seed}"}}
    return graph


def image_graph(seed: int) -> dict:
    graph = shipped_workflow("flux_txt2img_parallel")
    node_of(graph, "ParallelLoader")["inputs"].update(LOADER)
    node_of(graph, "ParallelSampler")["inputs"].update(seed=seed, steps=4)
    return graph


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?!/)[\w.-]+/|[A-Za-z]:\\")


def shown_in_page(entry: dict) -> str:
    """What the page shows of a failed prompt: the error's type, message and the node's inputs.

    The traceback ComfyUI adds lists the Python files of ComfyUI and the pack (where they are
    installed): ComfyUI's own choice, left out here.
    """
    shown = []
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            shown.extend(strings({k: v for k, v in data.items() if k != "traceback"}))
    assert shown, entry["status"]
    return "\n".join(shown)


def strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif value is not None:
        yield str(value)


def assert_page_safe(server, entry: dict) -> str:
    text = shown_in_page(entry)
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text).group(0) + "\n" + text
    assert str(server.base) not in text and "/tmp" not in text, text
    assert SECRET not in text, text
    return error_message(entry)


def run_with_fault(server, fault_file, fault: str, graph: dict) -> tuple[dict, float]:
    faults.arm(fault_file, fault)
    entry = server.run(graph, timeout_s=120)
    noticed = time.monotonic()
    fired = faults.fired_at(fault_file)
    assert fired is not None, f"the fault {fault} did not fire"
    return entry, noticed - fired


def test_a_worker_killed_mid_sampling_is_a_page_safe_error_within_10_s_and_the_next_prompt_succeeds(server, fault_file):
    assert status_str(server.run(image_graph(1))) == "success"  # a warm pool
    old_pids = pool_status(server)["pids"]
    entry, delay = run_with_fault(server, fault_file, "mid_sampling:1:kill", image_graph(2))
    assert status_str(entry) == "error" and delay < NOTICED_WITHIN_S, delay
    message = assert_page_safe(server, entry)
    assert "worker rank 1" in message and "SIGKILL" in message and "(sampling, after step" in message, message
    assert "worker-1.run" in message  # the log is named, without its folder
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in old_pids)
    entry = server.run(image_graph(3))
    assert status_str(entry) == "success", error_message(entry)


def test_a_worker_killed_while_decoding_is_a_page_safe_error_and_the_next_prompt_succeeds(server, fault_file):
    entry, delay = run_with_fault(server, fault_file, "vae_decode:0:kill", image_graph(4))
    assert status_str(entry) == "error" and delay < NOTICED_WITHIN_S, delay
    message = assert_page_safe(server, entry)
    assert "worker rank 0" in message and "(the VAE decode)" in message, message
    assert status_str(server.run(image_graph(5))) == "success"


def test_out_of_memory_on_one_rank_is_a_page_safe_error_saying_what_to_change(server, fault_file):
    entry, delay = run_with_fault(server, fault_file, "mid_sampling:1:oom", image_graph(6))
    assert status_str(entry) == "error" and delay < NOTICED_WITHIN_S, delay
    message = assert_page_safe(server, entry)
    assert "WorkerOutOfMemoryError" in message and "worker rank 1" in message and "ran out of memory" in message, message
    assert "lower the resolution or the batch size" in message and "pipefusion_parallel_degree" in message, message
    assert status_str(server.run(image_graph(7))) == "success"


def test_a_worker_killed_while_loading_is_a_page_safe_error_and_the_next_prompt_succeeds(server, fault_file):
    entry, delay = run_with_fault(server, fault_file, "load:1:kill", latent_graph("sd3", 8))  # a model not loaded yet
    assert status_str(entry) == "error" and delay < NOTICED_WITHIN_S, delay
    message = assert_page_safe(server, entry)
    assert "worker rank 1" in message and "(loading the model)" in message, message
    assert status_str(server.run(latent_graph("sd3", 9))) == "success"


def test_a_corrupt_checkpoint_is_named_by_its_file_name_only(server):
    graph = image_graph(10)
    node_of(graph, "ParallelLoader")["inputs"]["model_name"] = "corrupt.safetensors"
    entry = server.run(graph)
    assert status_str(entry) == "error"
    message = assert_page_safe(server, entry)
    assert "corrupt.safetensors" in message, message


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_50_prompts_with_two_alternating_models_all_succeed_match_one_worker_and_keep_memory_flat(server):
    started = time.monotonic()
    host = psutil.Process(server.process.pid)
    before, samples, saved = None, {7: None, 24: None, 49: None}, {}
    for index in range(50):
        model = "flux" if index % 2 == 0 else "sd3"
        entry = server.run(latent_graph(model, seed=1000 + index), timeout_s=120)
        assert status_str(entry) == "success", f"prompt {index + 1} ({model}): {error_message(entry)}"
        if index in samples:
            saved[index] = (model, saved_latent(server, entry))
        if index == 4:  # after prompt 5
            pool = pool_status(server)
            before = {"host": rss(host.pid), **{pid: rss(pid) for pid in pool["pids"]}, "fds": host.num_fds(),
                      "children": len(host.children(recursive=True)), "pool": pool}
    pool = pool_status(server)
    after = {"host": rss(host.pid), **{pid: rss(pid) for pid in pool["pids"]}}
    elapsed = time.monotonic() - started
    growth = {key: (after[key] - before[key]) / 2**20 for key in after}
    print(f"50 prompts in {elapsed:.0f} s; resident memory growth from prompt 5 to 50 (MiB): {growth}; "
          f"loads {before['pool']['load_count']} -> {pool['load_count']}")
    # The same workers served every prompt; alternating models reloads weights, never the pool.
    assert pool["pids"] == before["pool"]["pids"] and pool["generation"] == before["pool"]["generation"]
    assert pool["load_count"] - before["pool"]["load_count"] == 45
    # Growth is what a leak looks like. Resident memory may also fall: the allocator returns freed
    # pages to the system when it likes (CI once saw ComfyUI's host 244 MiB lower at prompt 50 than at
    # prompt 5, after the earlier fault tests in this module), which is not a leak.
    for key in after:
        assert after[key] - before[key] <= MEMORY_SLACK, (key, growth)
    assert host.num_fds() <= before["fds"] + 5, (before["fds"], host.num_fds())
    assert len(host.children(recursive=True)) == before["children"]
    assert set(shm.our_segments(host.pid)) <= set(pool["shared_memory"]) and len(pool["shared_memory"]) <= 2

    # A sample of the outputs against one worker with the same inputs.
    for index, (model, latent) in saved.items():
        entry = server.run(latent_graph(model, seed=1000 + index, devices="cpu"), timeout_s=120)
        assert status_str(entry) == "success", error_message(entry)
        one = saved_latent(server, entry)
        error = float((latent - one).abs().max() / one.abs().max())
        assert error <= 1e-4, (index, model, error)
    assert not torch.equal(saved[7][1], saved[49][1])
