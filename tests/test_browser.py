"""The pack in ComfyUI's own page, in headless Chromium (Debian's chromium, driven by Playwright).

Each UI workflow in workflows/ is loaded with app.loadGraphData; script in the page lists the
nodes whose type no extension registered (ComfyUI keeps those as plain, red "missing" nodes).
One shipped API workflow then runs on tiny random files and the status panel must show the pool.
Screenshots (and the page's console) are kept in $COMFY_XDIT_ARTIFACTS/browser, by default
<repo>/test-artifacts/browser.

tools/setup.sh installs playwright (PyPI) and, as root with apt, Debian's chromium; Playwright's
own browser download is never used. Without either the module skips.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from comfy_xdit.comfyui_server import COMFYUI, REPO, ComfyServer, error_message, shipped_workflow, status_str, with_demo_conditioning

CHROMIUM = os.environ.get("COMFY_XDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="tools/setup.sh installs playwright")
pytestmark = [
    pytest.mark.skipif(not (COMFYUI / "main.py").exists(), reason="tools/setup.sh installs the test ComfyUI"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium: tools/setup.sh installs Debian's package as root"),
]

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ARTIFACTS = Path(os.environ.get("COMFY_XDIT_ARTIFACTS") or REPO / "test-artifacts") / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # The page asks api.comfy.org for node and release data: no host but loopback resolves.
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
# A settled first visit: no template browser (the new-user path) and no minimap over the canvas.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
CONTEXT_DIM, POOLED_DIM = 32, 24
PANEL = "comfy-xdit-status"

# Nodes that no extension registered: ComfyUI builds them as bare LGraphNodes flagged has_errors.
UNREGISTERED_NODES = """() => app.graph._nodes
    .filter((node) => !LiteGraph.registered_node_types[node.type] || node.has_errors)
    .map((node) => ({id: node.id, type: node.type, has_errors: !!node.has_errors}))"""
MISSING_NODES_DIALOG = "This workflow has missing nodes"


def write_tiny_models(models: Path) -> None:
    """The random DiT and VAE files the run uses (as in test_comfyui_integration.py)."""
    from safetensors.torch import save_file

    from checkpoints import make_flux_diffusers_model, write_bfl_file
    from vae_files import make_ldm_vae_state_dict

    model = make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=4, head_dim=16, seed=0,
                                      joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=POOLED_DIM)
    write_bfl_file(model, models / "diffusion_models" / "tiny_flux.safetensors", prefix="model.diffusion_model.")
    save_file(make_ldm_vae_state_dict(seed=2), str(models / "vae" / "tiny_ae.safetensors"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ComfyServer(tmp_path_factory.mktemp("comfyui_browser"))
    with ThreadPoolExecutor(1) as pool:  # the files are written while ComfyUI starts
        started = pool.submit(server.start)
        try:
            write_tiny_models(server.base / "models")
        finally:
            started.result()
    status, answer = server.post("/settings", SETTINGS)
    assert status == 200, answer
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def page(server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console = open(ARTIFACTS / "console.log", "w")
    page = browser.new_page()
    page.on("console", lambda message: console.write(f"{message.type}: {message.text}\n"))
    page.on("pageerror", lambda error: console.write(f"pageerror: {error}\n"))
    page.on("requestfailed", lambda request: console.write(f"requestfailed: {request.url} {request.failure}\n"))
    open_comfyui(page, server)
    yield page
    page.close()
    console.close()


def open_comfyui(page, server) -> None:
    page.goto(server.url + "/", wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                           " && document.querySelector('#graph-canvas')", timeout=60_000)
    # The pack's extension has run its setup once the panel shows any state.
    page.wait_for_function(f"() => document.getElementById('{PANEL}')?.textContent.startsWith('xDiT')", timeout=30_000)


def screenshot(page, name: str) -> Path:
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(300)  # a few animation frames: the canvas draws on the next one
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def test_the_page_registers_the_pack_nodes(page):
    registered = page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
    for name in ("ParallelLoader", "ParallelLoraLoader", "ParallelSampler", "ParallelVAEDecode"):
        assert name in registered


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_with_every_node_type_registered(page, path):
    workflow = json.loads(path.read_text())
    page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
    types = page.evaluate("() => app.graph._nodes.map((node) => node.type)")
    assert sorted(types) == sorted(node["type"] for node in workflow["nodes"])
    unregistered = page.evaluate(UNREGISTERED_NODES)
    shot = screenshot(page, path.stem)
    assert not unregistered, f"nodes without a registered type in {path.name}: {unregistered} (see {shot})"
    assert page.get_by_text(MISSING_NODES_DIALOG).count() == 0, f"missing-nodes dialog shown (see {shot})"


def test_the_check_sees_an_unregistered_node(page):
    """The page script above would catch a node type that no extension registered."""
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "NoSuchXditNode"
    page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
    assert [node["type"] for node in page.evaluate(UNREGISTERED_NODES)] == ["NoSuchXditNode"]
    page.keyboard.press("Escape")  # close the missing-nodes dialog


def tiny_txt2img() -> dict:
    graph = with_demo_conditioning(shipped_workflow("flux_txt2img_parallel"), CONTEXT_DIM, POOLED_DIM)
    for node in graph.values():
        cls = node["class_type"]
        if cls == "ParallelLoader":
            node["inputs"].update(model_name="tiny_flux.safetensors", devices="cpu")
        elif cls == "ParallelSampler":
            node["inputs"].update(steps=2)
        elif cls == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=48)
        elif cls == "VAELoader":
            node["inputs"]["vae_name"] = "tiny_ae.safetensors"
    return graph


def panel_text(page) -> str:
    return page.evaluate(f"() => document.getElementById('{PANEL}').textContent")


def test_status_panel_shows_the_pool_after_a_run(server, page):
    assert panel_text(page).startswith("xDiT pool: not started")
    page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", json.loads(WORKFLOWS[-1].read_text()))
    entry = server.run(tiny_txt2img())
    assert status_str(entry) == "success", error_message(entry) + server.log()[-2000:]
    # Pushed to the open page by the server's comfy_xdit.status event...
    page.wait_for_function(f"() => document.getElementById('{PANEL}').textContent.includes('xDiT pool: running')",
                           timeout=30_000)
    text = panel_text(page)
    assert "tiny_flux.safetensors" in text and "rank 0 cpu alive" in text, text
    screenshot(page, "status_after_run")
    # ...and read by a fresh page from GET /comfy_xdit/status.
    page.reload(wait_until="domcontentloaded")
    open_comfyui(page, server)
    assert "xDiT pool: running" in panel_text(page)
    screenshot(page, "status_after_reload")
