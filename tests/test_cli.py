"""The command line as users run it: the demo end to end, and bad input refused in one line."""

from __future__ import annotations

import subprocess
import sys


def comfy_xdit(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfy_xdit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_demo_prints_both_timings_and_the_difference(tmp_path):
    run = comfy_xdit("demo", "--engine-only", "--out", str(tmp_path / "demo"), "--size", "128", "--steps", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1 worker:" in run.stdout and "2 workers (" in run.stdout
    difference = float(run.stdout.split("max difference: ")[1].split()[0])
    assert difference < 1e-3
    for name in ("demo.latent", "demo_preview.png", "demo_flux_transformer.safetensors"):
        assert (tmp_path / "demo" / name).exists()


def test_generate_refuses_degrees_that_do_not_fit_the_devices(tmp_path):
    run = comfy_xdit("generate", "--model", str(tmp_path / "x.safetensors"), "--random-conditioning",
                     "--ulysses-degree", "3", "--devices", "cpu,cpu")
    assert run.returncode == 2
    assert "multiply to 3 workers" in run.stderr and "Traceback" not in run.stderr


def test_generate_refuses_a_missing_checkpoint_without_a_traceback(tmp_path):
    run = comfy_xdit("generate", "--model", str(tmp_path / "missing.safetensors"), "--random-conditioning", "--workers", "1")
    assert run.returncode == 2
    assert "checkpoint not found" in run.stderr and "Traceback" not in run.stderr


def test_demo_through_comfyui_prints_timings_difference_and_image(tmp_path):
    from comfy_xdit.comfyui_server import COMFYUI

    if not (COMFYUI / "main.py").exists():
        import pytest

        pytest.skip("tools/setup.sh installs the test ComfyUI")
    run = comfy_xdit("demo", "--out", str(tmp_path / "demo"), "--size", "64", "--steps", "2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "through ComfyUI" in run.stdout and "1 worker:" in run.stdout and "2 workers (" in run.stdout
    assert float(run.stdout.split("max difference: ")[1].split()[0]) < 1e-3
    image = run.stdout.split("image: ")[1].split()[0]
    assert image.endswith(".png") and (tmp_path / "demo").exists()
