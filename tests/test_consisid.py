"""ConsisID on the diffusers-scheduler path: one worker equals diffusers' ConsisIDPipeline, every exact
parallel method equals one worker, the identity inputs matter, loading and refusals.

A tiny ConsisID (tests/consisid_files.py: 2 heads x 16, 2 blocks each followed by the face
cross-attention, random weights), float32, gloo processes on the CPU. The latent is 3 frames of
10x10 (75 video tokens: every sequence-parallel degree needs padding); 7 text tokens stay whole.
The face image (96x72 px, resized to the video's 80x80 as the pipeline does) is encoded by the
tiny CogVideoX VAE of the folder.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_xdit.consisid_identity import face_latent_distribution, read_identity_file, save_identity_file
from comfy_xdit.engine import RankEngine
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from comfy_xdit.requests import ConsisIDConditioning, ModelSpec, SampleRequest
from cogvideox_files import make_cogvideox_vae
from consisid_files import (as_pil, consisid_pipeline_latents, face_image, identity, make_consisid_model,
                            write_consisid_folder)
from distributed import cpu_engine, relative_error, run_on_ranks
from family_parallel import TOLERANCE, assert_every_rank_equals, swap_shards

PIPELINE_TOLERANCE = 1e-5
LATENT = (3, 10, 10)  # frames, height, width
SCALE = 0.7  # the CogVideoX-5b VAE's (and the tiny VAE's) scaling factor
FACE = face_image(96, 72)


def texts():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)


def conditioning(identity_seed: int = 3):
    vae = make_cogvideox_vae()
    mean, std = face_latent_distribution(vae, FACE, LATENT[1] * 8, LATENT[2] * 8)
    id_cond, hidden = identity(identity_seed)
    positive, negative = texts()
    make = lambda context: ConsisIDConditioning(context, id_cond, torch.stack(hidden, dim=1), mean, std,  # noqa: E731
                                                vae.config.scaling_factor)
    return make(positive), make(negative)


def request(batch: int = 1, cfg: float = 6.0, identity_seed: int = 3) -> SampleRequest:
    positive, negative = conditioning(identity_seed)
    return SampleRequest(torch.zeros(batch, 16, *LATENT), positive, negative, seed=5, steps=3, cfg=cfg)


def engine_for(path, config_kwargs: dict | None = None) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.load(ModelSpec(str(path), family="consisid", dtype="float32"))
    return engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_consisid_folder(tmp_path_factory.mktemp("consisid") / "consisid", make_consisid_model())


@pytest.mark.parametrize("cfg", [6.0, 1.0])
def test_one_worker_equals_the_consisid_pipeline(folder, cfg):
    ours = engine_for(folder).sample(request(cfg=cfg))
    positive, negative = texts()
    id_cond, hidden = identity()
    expected = consisid_pipeline_latents(make_consisid_model(), as_pil(FACE), positive, negative, id_cond, hidden,
                                         frames=3, height=10, width=10, seed=5, steps=3, guidance_scale=cfg)
    expected = expected.permute(0, 2, 1, 3, 4) / SCALE  # the pipeline's [B, T, C, H, W] -> ComfyUI's raw LATENT
    assert expected.abs().max() > 1
    error = relative_error(ours, expected)
    print(f"consisid cfg {cfg}: {error:.2e} from ConsisIDPipeline")
    assert error < PIPELINE_TOLERANCE, f"cfg {cfg}: {error:.2e} from ConsisIDPipeline"


def test_the_identity_and_the_face_image_change_the_video(folder):
    engine = engine_for(folder)
    reference = engine.sample(request())
    other_identity = engine.sample(request(identity_seed=9))
    assert relative_error(other_identity, reference) > 1e-3, "id_cond / id_vit_hidden did not reach the model"
    other_face = request()
    for which in ("positive", "negative"):
        cond = getattr(other_face, which)
        setattr(other_face, which, dataclasses.replace(cond, face_mean=cond.face_mean.flip(-1)))
    assert relative_error(engine.sample(other_face), reference) > 1e-3, "the face image latent did not reach the model"


CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2": (dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = "ulysses=2, shards swapped"


def generate_all_cases(path: str) -> dict:
    results = {name: engine_for(path, kwargs).sample(request(batch)) for name, (kwargs, batch) in CASES.items()}
    engine = engine_for(path, dict(ulysses_degree=2))
    results[WRONG_ORDER] = swap_shards(engine).sample(request())
    return results


@pytest.fixture(scope="module")
def two_workers(folder):
    return run_on_ranks(2, generate_all_cases, str(folder))


@pytest.fixture(scope="module")
def one_worker(folder):
    engine = engine_for(folder)
    return {batch: engine.sample(request(batch)) for batch in (1, 2)}


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, one_worker, two_workers):
    _, batch = CASES[name]
    assert_every_rank_equals(name, two_workers, one_worker[batch], (batch, 16, *LATENT))


def test_wrong_shard_order_is_caught(one_worker, two_workers):
    assert relative_error(two_workers[0][WRONG_ORDER], one_worker[1]) > 100 * TOLERANCE


def test_identity_file_round_trip_and_refusals(tmp_path):
    id_cond, hidden = identity()
    path = tmp_path / "face.safetensors"
    save_identity_file(path, id_cond, hidden)
    read_cond, read_hidden = read_identity_file(path)
    assert torch.equal(read_cond, id_cond) and torch.equal(read_hidden, torch.stack(hidden, dim=1))
    from safetensors.torch import save_file

    save_file({"id_cond": id_cond}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="no id_vit_hidden.0"):
        read_identity_file(tmp_path / "half.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable identity file"):
        read_identity_file(tmp_path / "junk.safetensors")


def test_request_refusals(folder):
    engine = engine_for(folder)
    wrong_size = request()
    wrong_size.latent = torch.zeros(1, 16, 3, 12, 10)
    with pytest.raises(ValueError, match="make the latent and the face latent with one Parallel ConsisID Identity"):
        engine.sample(wrong_size)
    wrong_id = request()
    for which in ("positive", "negative"):
        setattr(wrong_id, which, dataclasses.replace(getattr(wrong_id, which), id_cond=torch.zeros(1, 5)))
    with pytest.raises(ValueError, match=r"id_cond is \[1, 5\] but this ConsisID takes \[1, 12\]"):
        engine.sample(wrong_id)
    two_faces = request()
    two_faces.negative = dataclasses.replace(two_faces.negative, id_cond=torch.zeros(1, 12))
    with pytest.raises(ValueError, match="different identities"):
        engine.sample(two_faces)


def test_loading_and_folder_refusals(folder, tmp_path):
    assert families.detect(folder) is families.CONSISID
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert families.detect(weights) is families.CONSISID
    assert families.CONSISID.read_config(str(weights))["is_train_face"] is True
    missing = write_consisid_folder(tmp_path / "missing", scheduler=None, vae=False)
    with pytest.raises(CheckpointError, match="no scheduler/scheduler_config.json"):
        families.CONSISID.read_config(str(missing))
    single = tmp_path / "consisid.safetensors"
    single.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="ConsisID loads from its diffusers folder"):
        families.CONSISID.read_config(str(single))
