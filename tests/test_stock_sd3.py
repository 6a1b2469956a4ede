"""One worker matches stock ComfyUI's KSampler on the same SD3 / SD3.5 files (a few cases).

tests/stock_sd3_compare.py runs both sides in one subprocess (ComfyUI's top-level modules must
stay out of this process): a transformer-only SD3 medium-style file through UNETLoader and a
whole SD3.5 medium-style checkpoint through CheckpointLoaderSimple's loader, float32, each case
within DESIGN.md's 1e-5 relative error; two cases put stock LoraLoaderModelOnly (Kohya, and
PEFT chained with a negative strength) in front of KSampler and give our engine the same files. Small files (width 128), so it takes about a minute.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "stock_sd3_compare.py"
COMFYUI = HERE.parent / ".comfyui" / "ComfyUI"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    if not (COMFYUI / "nodes.py").exists():
        pytest.skip(f"pristine ComfyUI not found at {COMFYUI} (tools/setup.sh puts it there)")
    workdir = tmp_path_factory.mktemp("stock_sd3")
    out = workdir / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(workdir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=str(workdir))
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{SCRIPT.name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_stock_side_is_sd3_in_float32_with_comfyuis_sampling(result):
    for name, stock in result["stock"].items():
        assert stock["model_class"] == "SD3" and stock["latent_format"] == "SD3", name
        assert stock["weight_dtype"] == "torch.float32" and stock["manual_cast_dtype"] == "None", name
        assert (stock["shift"], stock["multiplier"]) == (3.0, 1000.0), name
    assert result["stock"]["checkpoint"]["x_block_self_attn_layers"] == [0]  # SD3.5 medium's attn2 was seen


def test_one_worker_matches_stock_ksampler(result):
    bad = [c for c in result["cases"] if not c["rel_error"] < TOLERANCE]
    listing = "\n".join(f"{c['name']}: rel {c['rel_error']:.2e} {c.get('error', '')}\n{c.get('traceback', '')}" for c in bad)
    assert not bad, f"{len(bad)} cases differ from stock KSampler by {TOLERANCE:g} or more:\n{listing}"
    assert len(result["cases"]) >= 6 and not any(math.isnan(c["rel_error"]) for c in result["cases"])


def test_loras_match_stock_lora_loader(result):
    """The LoRA cases ran (single and chained, a negative strength) and each LoRA really changes the
    result (else matching stock would prove nothing about LoRA)."""
    lora_cases = [c for c in result["cases"] if c.get("loras")]
    assert {len(c["loras"]) for c in lora_cases} == {1, 2} and {c["file"] for c in lora_cases} == {"unet", "checkpoint"}
    assert any(strength < 0 for c in lora_cases for _, strength, _ in c["loras"])
    for case in lora_cases:
        assert case.get("lora_effect", 0.0) > 1e-2, f"{case['name']}: the LoRA barely changes the result"
