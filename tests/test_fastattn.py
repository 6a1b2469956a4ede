"""DiTFastAttn on Flux and PixArt: each method does what it says, calibration follows its threshold, and data
and cfg parallel give one worker's latents with the same settings.

Tiny Flux (random weights), float32. Random weights cannot make a quality-meaningful plan; these
tests check the mechanics: an all-"full" plan changes nothing, each method is applied and equals a
hand-computed reference, the calibration's threshold decides, and every rank ends with one plan.
"""

from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_flux_diffusers_model
from comfy_xdit.caching.settings import settings_from_choice
from comfy_xdit.config import ConfigError, ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.fastattn.plan import FULL, SHARE_CFG, SHARE_STEP, WINDOW_RESIDUAL, FastAttnPlan
from comfy_xdit.fastattn.processor import FastAttnFluxProcessor, FastAttnRun
from comfy_xdit.fastattn.settings import DEFAULT_THRESHOLD, FastAttnSettings
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.models.flux import flux_attention_output, flux_query_key_value
from comfy_xdit.requests import FluxConditioning, ModelSpec, PixArtConditioning, SampleRequest
from distributed import cpu_engine, relative_error, run_on_ranks
from pixart_files import make_pixart_diffusers_model

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
STEPS = 4
LAYERS = 2  # one double and one single block
WINDOW = 2  # tokens each side: small against the 6 text + 16 image tokens, so the window matters


def tiny_model():
    return make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=2, head_dim=8, seed=0)


def request(batch: int, cache) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    # Text of the same length, so one worker batches the two CFG branches into one call (ASC needs it).
    positive = FluxConditioning(torch.randn(1, 6, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    negative = FluxConditioning(torch.randn(1, 6, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    latent = 2 * torch.randn(batch, 16, 8, 8, generator=g)
    return SampleRequest(latent, positive, negative, seed=3, steps=STEPS, cfg=2.0, denoise=0.8, cache=cache)


def pixart_request(batch: int, cache) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive, negative = (PixArtConditioning(torch.randn(1, 7, 32, generator=g)) for _ in range(2))
    # PixArt's smallest size ComfyUI takes: (width + height) / 2 of at least 264 px (399 image tokens).
    return SampleRequest(torch.zeros(batch, 4, 34, 34), positive, negative, seed=3, steps=3, cfg=4.5, scheduler="normal",
                         cache=cache)


def engine_on(config_kwargs: dict, family: str = "flux") -> RankEngine:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = ParallelMesh.build(ParallelConfig(devices=("cpu",) * world, **config_kwargs), torch.device("cpu"))
    engine = RankEngine(mesh)
    if family == "pixart":
        engine.set_model(make_pixart_diffusers_model(num_layers=2), ModelSpec("tiny", family="pixart", dtype="float32"))
    else:
        engine.set_model(tiny_model(), ModelSpec("tiny", dtype="float32"))
    return engine


def sample_calibrated(engine: RankEngine, batch: int, settings: FastAttnSettings, make_request=request):
    """(latents, the plan the job calibrated)."""
    latents = engine.sample(make_request(batch, settings))
    plans = engine.model.__dict__["_comfy_xdit_fastattn_plans"]
    return latents, list(plans.values())[-1]


@pytest.fixture(scope="module")
def one_worker():
    engine = engine_on({})
    return engine, engine.sample(request(1, None))


def test_all_full_plan_equals_no_fastattn(one_worker):
    engine, base = one_worker
    latents = engine.sample(request(1, FastAttnSettings(plan=FastAttnPlan.all_full(LAYERS, STEPS), window=WINDOW)))
    assert torch.equal(latents, base)


@pytest.mark.parametrize("method", [SHARE_STEP, WINDOW_RESIDUAL, SHARE_CFG])
def test_each_method_alone_changes_the_output(method, one_worker):
    engine, base = one_worker
    plan = FastAttnPlan.uniform(LAYERS, STEPS, method)  # the method on steps 1 and 3, full on 0 and 2
    latents = engine.sample(request(1, FastAttnSettings(plan=plan, window=WINDOW)))
    assert relative_error(latents, base) > 1e-3


def test_share_cfg_runs_full_where_the_branches_are_separate_calls():
    # Texts of different lengths cannot share one call: each branch is its own call, and a
    # share_cfg entry computes full attention (so the latents are those of no DiTFastAttn).
    engine = engine_on({})
    separate = request(1, None)
    separate.negative = FluxConditioning(torch.randn(1, 4, 32), torch.randn(1, 24), 3.5)
    base = engine.sample(separate)
    separate.cache = FastAttnSettings(plan=FastAttnPlan.uniform(LAYERS, STEPS, SHARE_CFG, every=1), window=WINDOW)
    assert torch.equal(engine.sample(separate), base)
    separate.cache = FastAttnSettings(1.0, window=WINDOW)
    engine.sample(separate)
    assert not list(engine.model.__dict__["_comfy_xdit_fastattn_plans"].values())[-1].uses(SHARE_CFG)


# --- one attention layer against hand-computed references ------------------------------------------


def reference_attention(q, k, v, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, with the 1-D band |i - j| <= window if given."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if window is not None:
        index = torch.arange(q.shape[1])
        scores = scores.masked_fill((index[:, None] - index[None, :]).abs() > window, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2, 3)


@pytest.fixture(scope="module")
def layer():
    """The double block's attention and two steps of inputs: rows [conditional, unconditional]."""
    attn = tiny_model().transformer_blocks[0].attn.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    steps = [(torch.randn(2, 16, 16, generator=g), torch.randn(2, 6, 16, generator=g)) for _ in range(2)]
    return attn, steps


def run_layer(attn, steps, methods: tuple[str, ...], window: int = WINDOW):
    plan = FastAttnPlan((methods,))
    run = FastAttnRun(layers=1, steps=len(methods), window=window, plan=plan, calibration=None,
                      share_cfg_allowed=True, rows=1, branch="branch0")
    processor = FastAttnFluxProcessor(run, 0)
    outputs = []
    for step, (hidden, text) in enumerate(steps):
        run.step = step
        outputs.append(processor(attn, hidden, text))
    return outputs


def by_hand(attn, hidden, text, window=None):
    q, k, v = flux_query_key_value(attn, hidden, text)
    return flux_attention_output(attn, reference_attention(q, k, v, window), True, text.shape[1])


def test_full_step_is_attention(layer):
    attn, steps = layer
    image, text = run_layer(attn, steps, (FULL, FULL))[1]
    want_image, want_text = by_hand(attn, *steps[1])
    assert relative_error(image, want_image) < 1e-5 and relative_error(text, want_text) < 1e-5


def test_share_step_returns_the_previous_steps_output(layer):
    attn, steps = layer
    first, second = run_layer(attn, steps, (FULL, SHARE_STEP))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert relative_error(second[0], by_hand(attn, *steps[1])[0]) > 1e-3  # step 1's own output differs


def test_window_residual_adds_the_kept_residual_to_window_attention(layer):
    attn, steps = layer
    image, text = run_layer(attn, steps, (FULL, WINDOW_RESIDUAL))[1]
    q0, k0, v0 = flux_query_key_value(attn, *steps[0])
    residual = reference_attention(q0, k0, v0) - reference_attention(q0, k0, v0, WINDOW)
    q1, k1, v1 = flux_query_key_value(attn, *steps[1])
    want_image, want_text = flux_attention_output(attn, reference_attention(q1, k1, v1, WINDOW) + residual, True, 6)
    assert relative_error(image, want_image) < 1e-5 and relative_error(text, want_text) < 1e-5
    assert relative_error(image, by_hand(attn, *steps[1])[0]) > 1e-3  # not simply full attention


def test_window_covering_every_token_equals_full_attention(layer):
    attn, steps = layer
    image, text = run_layer(attn, steps, (FULL, WINDOW_RESIDUAL), window=22)[1]  # 6 text + 16 image tokens
    want_image, want_text = by_hand(attn, *steps[1])
    assert relative_error(image, want_image) < 1e-5 and relative_error(text, want_text) < 1e-5


def test_share_cfg_gives_the_unconditional_rows_the_conditional_output(layer):
    attn, steps = layer
    image, text = run_layer(attn, steps[:1], (SHARE_CFG,))[0]
    want_image, want_text = by_hand(attn, steps[0][0][:1], steps[0][1][:1])
    for got, want in ((image, want_image), (text, want_text)):
        assert relative_error(got[:1], want) < 1e-5 and torch.equal(got[1:], got[:1])


# --- calibration ----------------------------------------------------------------------------------


def test_threshold_zero_calibrates_an_all_full_plan(one_worker):
    engine, base = one_worker
    latents, plan = sample_calibrated(engine, 1, FastAttnSettings(0.0, window=WINDOW))
    assert plan == FastAttnPlan.all_full(LAYERS, STEPS)
    assert torch.equal(latents, base)
    # Calibration did measure: every entry after step 0 had candidates with finite errors.
    measured = [e for e in engine.last_cache_record if e.step > 0]
    assert len(measured) == LAYERS * (STEPS - 1) and all(math.isfinite(x) for e in measured for x in e.errors.values())


def test_large_threshold_compresses_and_the_stored_plan_replays_the_calibrating_job(one_worker):
    engine, base = one_worker
    settings = FastAttnSettings(1.0, window=WINDOW)
    latents, plan = sample_calibrated(engine, 1, settings)
    assert plan.compressed_fraction() >= 0.25, plan
    assert relative_error(latents, base) > 1e-3
    # The second job runs the stored plan without calibrating, and gets the same latents.
    again = engine.sample(request(1, settings))
    assert engine.last_cache_record == [] and torch.equal(again, latents)


def test_node_choice_takes_the_default_threshold():
    settings = settings_from_choice("ditfastattn", 0.0)
    assert isinstance(settings, FastAttnSettings) and settings.effective_threshold == DEFAULT_THRESHOLD
    assert settings_from_choice("ditfastattn", 0.2).effective_threshold == 0.2


# --- parallel: N workers == 1 worker --------------------------------------------------------------

# Calibrated at a threshold where the plan mixes methods, and a fixed plan with every method
# that the mesh allows, so a wrong residual, share or reduction would show in the latents.
CALIBRATED = 0.6
MIXED_PLAN = FastAttnPlan(((FULL, WINDOW_RESIDUAL, SHARE_STEP, WINDOW_RESIDUAL), (FULL, SHARE_CFG, WINDOW_RESIDUAL, SHARE_STEP)))
NO_CFG_SHARE = FastAttnPlan(((FULL, WINDOW_RESIDUAL, SHARE_STEP, WINDOW_RESIDUAL), (FULL, SHARE_STEP, WINDOW_RESIDUAL, FULL)))
CASES = {
    "data=2, batch 2": (dict(data_parallel_degree=2), 2, True, MIXED_PLAN),
    "cfg=2": (dict(use_cfg_parallel=True), 1, False, NO_CFG_SHARE),
}


def sample_case(config_kwargs: dict, batch: int, share_cfg: bool, plan: FastAttnPlan) -> dict:
    engine = engine_on(config_kwargs)
    calibrated, chosen = sample_calibrated(engine, batch, FastAttnSettings(CALIBRATED, window=WINDOW, share_cfg=share_cfg))
    fixed = engine.sample(request(batch, FastAttnSettings(plan=plan, window=WINDOW)))
    out = {"calibrated": calibrated, "plan": chosen.methods, "fixed": fixed}
    if config_kwargs.get("use_cfg_parallel"):
        out["refusals"] = refusals(engine)
    return out


def sample_pixart(config_kwargs: dict) -> dict:
    engine = engine_on(config_kwargs, "pixart")
    latents, plan = sample_calibrated(engine, 1, FastAttnSettings(PIXART_CALIBRATED, window=PIXART_WINDOW, share_cfg=False),
                                      pixart_request)
    return {"calibrated": latents, "plan": plan.methods}


def sample_cases() -> dict:
    """Every case on the same two processes (one spawn: most of these tests' time on two cores)."""
    return {**{name: sample_case(*CASES[name]) for name in CASES}, "pixart cfg=2": sample_pixart(dict(use_cfg_parallel=True))}


def refusals(cfg_engine: RankEngine) -> list[str]:
    """The messages of what cfg parallel and Ulysses refuse (raised before any collective)."""
    messages = []
    try:
        cfg_engine.sample(request(1, FastAttnSettings(plan=MIXED_PLAN, window=WINDOW)))
    except ConfigError as error:
        messages.append(str(error))
    try:
        engine_on(dict(ulysses_degree=2)).sample(request(1, FastAttnSettings()))
    except ConfigError as error:
        messages.append(str(error))
    return messages


@pytest.fixture(scope="module")
def two_workers():
    return run_on_ranks(2, sample_cases)


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_equal_one(case, two_workers):
    config_kwargs, batch, share_cfg, plan = CASES[case]
    one = sample_case({}, batch, share_cfg, plan)
    assert FastAttnPlan(one["plan"]).compressed_fraction() >= 0.25
    for ranks in two_workers:
        rank = ranks[case]
        assert rank["plan"] == one["plan"]  # one plan on every rank, the one worker's
        assert relative_error(rank["calibrated"], one["calibrated"]) < TOLERANCE
        assert relative_error(rank["fixed"], one["fixed"]) < TOLERANCE
    if "cfg" in case:
        assert not FastAttnPlan(one["plan"]).uses(SHARE_CFG)
        for ranks in two_workers:
            share_cfg_refusal, ulysses_refusal = ranks[case]["refusals"]
            assert "use_cfg_parallel off" in share_cfg_refusal
            assert "ulysses_degree and ring_degree to 1" in ulysses_refusal
    else:
        assert FastAttnPlan(one["plan"]).uses(SHARE_CFG) or MIXED_PLAN.uses(SHARE_CFG)


def test_compile_is_refused_with_what_to_change():
    engine = cpu_engine()
    engine.set_model(tiny_model(), ModelSpec("tiny", dtype="float32", compile=True))  # compiles lazily, at the first call
    with pytest.raises(ConfigError, match="turn the loader's compile off"):
        engine.sample(request(1, FastAttnSettings()))


def test_cli_window_flag_reaches_the_settings():
    from comfy_xdit.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "x.safetensors", "--cache", "ditfastattn",
                                      "--fastattn-window", "8"])
    settings = settings_from_choice(args.cache, args.cache_threshold, fastattn_window=args.fastattn_window)
    assert settings == FastAttnSettings(window=8)



# --- PixArt: the self-attention (attn1) of every block ----------------------------------------------

PIXART_LAYERS, PIXART_STEPS, PIXART_WINDOW, PIXART_CALIBRATED = 2, 3, 16, 0.6


@pytest.fixture(scope="module")
def pixart_one_worker():
    engine = engine_on({}, "pixart")
    return engine, engine.sample(pixart_request(1, None))


def test_pixart_all_full_plan_equals_no_fastattn(pixart_one_worker):
    engine, base = pixart_one_worker
    plan = FastAttnPlan.all_full(PIXART_LAYERS, PIXART_STEPS)
    assert torch.equal(engine.sample(pixart_request(1, FastAttnSettings(plan=plan, window=PIXART_WINDOW))), base)


@pytest.mark.parametrize("method", [SHARE_STEP, WINDOW_RESIDUAL, SHARE_CFG])
def test_pixart_each_method_alone_changes_the_output(method, pixart_one_worker):
    engine, base = pixart_one_worker
    plan = FastAttnPlan.uniform(PIXART_LAYERS, PIXART_STEPS, method)
    latents = engine.sample(pixart_request(1, FastAttnSettings(plan=plan, window=PIXART_WINDOW)))
    # The tiny random PixArt's latents are dominated by what attention barely moves (measured 2e-6 to
    # 6e-5); an all-full plan is bit-identical, so a change well above float32 rounding shows the method ran.
    assert relative_error(latents, base) > 1e-6


def test_pixart_calibration_follows_the_threshold(pixart_one_worker):
    engine, base = pixart_one_worker
    latents, plan = sample_calibrated(engine, 1, FastAttnSettings(0.0, window=PIXART_WINDOW), pixart_request)
    assert plan == FastAttnPlan.all_full(PIXART_LAYERS, PIXART_STEPS) and torch.equal(latents, base)
    _, plan = sample_calibrated(engine, 1, FastAttnSettings(1.0, window=PIXART_WINDOW), pixart_request)
    assert plan.compressed_fraction() >= 0.25, plan


def test_pixart_cfg_parallel_equals_one_worker(two_workers):
    one = sample_pixart({})
    assert FastAttnPlan(one["plan"]).compressed_fraction() > 0, one["plan"]
    for ranks in two_workers:
        assert ranks["pixart cfg=2"]["plan"] == one["plan"]
        assert relative_error(ranks["pixart cfg=2"]["calibrated"], one["calibrated"]) < TOLERANCE
