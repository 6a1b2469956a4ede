"""Every wrong setting is refused before any process starts, with a message naming the fix."""

from __future__ import annotations

import pytest

from comfy_xdit.config import ConfigError, ParallelConfig


def test_a_valid_hybrid_config_has_the_expected_mesh():
    config = ParallelConfig(ulysses_degree=2, ring_degree=2, use_cfg_parallel=True, devices=("cpu",) * 8)
    assert config.mesh_shape == (1, 2, 1, 2, 2, 1, 1)  # data, cfg, pipefusion, ring, ulysses, tensor, distrifusion
    assert config.sequence_parallel_degree == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ulysses_degree=2, devices=("cpu",) * 3), "multiply to 2 workers"),
        (dict(ulysses_degree=0), "ulysses_degree must be a whole number of at least 1"),
        (dict(ring_degree=1.5), "ring_degree must be a whole number"),
        (dict(warmup_steps=-1), "warmup_steps must be"),
        (dict(attention_backend="fastest"), "attention_backend 'fastest' is unknown"),
        (dict(devices=()), "devices is empty"),
        (dict(ulysses_degree=2, devices=("cuda:0", "cuda:0")), "name a GPU twice"),
        (dict(ulysses_degree=2, devices=("cuda:0", "cpu")), "mix kinds"),
        (dict(use_cfg_parallel=True, devices=("cpu",)), "multiply to 2 workers"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**kwargs)


def test_heads_must_divide_by_ulysses():
    config = ParallelConfig(ulysses_degree=4, devices=("cpu",) * 4)
    with pytest.raises(ConfigError, match=r"does not divide the 6 attention heads.*\[1, 2, 3, 6\]"):
        config.check_model(num_heads=6, family="Flux")


def test_data_parallel_needs_a_batch_of_its_degree_and_cfg_parallel_needs_cfg():
    config = ParallelConfig(data_parallel_degree=2, devices=("cpu",) * 2)
    config.check_request(batch_size=3, uses_cfg=False)  # uneven shares are fine
    with pytest.raises(ConfigError, match="needs a batch of at least 2 images, got 1"):
        config.check_request(batch_size=1, uses_cfg=False)
    cfg_config = ParallelConfig(use_cfg_parallel=True, devices=("cpu",) * 2)
    with pytest.raises(ConfigError, match="raise cfg above 1"):
        cfg_config.check_request(batch_size=1, uses_cfg=False)


def test_pipefusion_checks_the_model_depth():
    config = ParallelConfig(pipefusion_parallel_degree=2, devices=("cpu",) * 2)
    config.check_model(num_heads=4, family="Flux", num_blocks=2)
    with pytest.raises(ConfigError, match="more stages than this Flux model's 1 transformer blocks"):
        config.check_model(num_heads=4, family="Flux", num_blocks=1)
