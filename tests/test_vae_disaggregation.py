"""VAE disaggregation: the decode of job 1 runs on its own worker while the DiT pool samples job 2.

DiT pool: two CPU workers (ulysses=2); VAE pool: one CPU worker of its own. The outputs must
equal those of the pool that does both (sampling and patch-parallel decode on its two workers).
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.config import ParallelConfig
from comfy_xdit.pool import WorkerPool
from comfy_xdit.pool.disaggregated import DisaggregatedPipeline
from comfy_xdit.requests import ModelSpec, VaeDecodeRequest, VaeWeights
from comfy_xdit.vae import decoder_state_dict, state_dict_fingerprint
from checkpoints import make_flux_diffusers_model, write_diffusers_folder
from test_pool import make_request
from vae_files import make_ldm_vae_state_dict

VAE_TOLERANCE = 1e-4  # DESIGN.md: absolute, on [0, 1] images (patch-parallel decode against one rank)

pytestmark = pytest.mark.timeout(300)


def test_job_2_samples_while_job_1_decodes_and_the_outputs_match_one_pool(tmp_path):
    spec = ModelSpec(str(write_diffusers_folder(make_flux_diffusers_model(), tmp_path / "flux")), dtype="float32")
    state = decoder_state_dict(make_ldm_vae_state_dict(seed=0, ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                                                       z_channels=16))
    vae = VaeWeights(state_dict_fingerprint(state), state, "float32")
    requests = [make_request(seed=1), make_request(seed=2)]
    dit_config = ParallelConfig(ulysses_degree=2, devices=("cpu", "cpu"))
    with WorkerPool(dit_config, job_timeout_s=60) as dit_pool, \
            WorkerPool(ParallelConfig(devices=("cpu",)), job_timeout_s=60) as vae_pool:
        dit_pool.load(spec)
        with DisaggregatedPipeline(dit_pool, vae_pool, vae) as pipeline:
            submitted = [pipeline.submit(request) for request in requests]
            latents = [latent for latent, _ in submitted]
            images = [image.result(timeout=120) for _, image in submitted]
        # Job 2's sampling started before job 1's decode ended: the two pools overlapped.
        assert pipeline.when("sample_start", 1) < pipeline.when("decode_end", 0), pipeline.events
        assert pipeline.when("decode_start", 0) < pipeline.when("sample_end", 1), pipeline.events

        # Without disaggregation: the DiT pool samples and decodes (over its two workers) itself.
        dit_pool.load_vae(vae)
        for request, latent, image in zip(requests, latents, images):
            alone = dit_pool.sample(request)
            assert torch.equal(latent, alone)
            decoded = dit_pool.decode(VaeDecodeRequest(vae.fingerprint, alone))
            assert image.shape == decoded.shape and image.shape[-1] == 3
            error = float((image - decoded).abs().max())
            print(f"disaggregated decode (1 worker) against the DiT pool's decode (2 workers): max abs {error:.2e}")
            assert error <= VAE_TOLERANCE
        assert not torch.equal(images[0], images[1])  # two seeds, two images: the check is not empty
