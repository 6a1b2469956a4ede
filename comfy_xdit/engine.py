"""One rank's engine: holds the loaded model between jobs and runs the parallel sampler.

The pool creates one RankEngine per worker process; scripts and tests may create one directly
(world size 1, or inside their own process group).
"""

from __future__ import annotations

import contextlib

import torch

from .attention.kernels import choose_lse_kernel
from .caching.job import cache_job_for
from .config import ConfigError, ParallelConfig
from .lora import LoraState, apply_loras
from .mesh import ParallelMesh
from .models import families, flux
from .request_checks import check_inputs_finite, check_sample_settings
from .requests import DTYPES, ModelSpec, NoHooks, SampleRequest, StepHooks, VaeDecodeRequest, VaeWeights
from .controlnets import ControlNetCache
from .controlnets import prepare as prepare_controls
from .sampling.ksampler import flow_sampling_for, rows_for_rank, run_ksampler

SUPPORTED_FAMILIES = tuple(families.FAMILIES)


def compile_repeated_blocks(model: torch.nn.Module, mesh: ParallelMesh, family: str) -> None:
    """torch.compile each transformer block class once (diffusers' regional compile).

    Regional rather than whole-model: the blocks are identical, so one compiled graph serves all
    of them and the compile takes seconds instead of minutes. With a sequence-parallel group the
    collectives inside attention may break the graph, so fullgraph is only asked for on one worker.
    Shapes are static per resolution: a new resolution compiles once more, a new seed or prompt
    of the same shape reuses the graphs.
    """
    single_worker = mesh.size("ulysses") * mesh.size("ring") * mesh.size("tensor") == 1
    model.compile_repeated_blocks(fullgraph=single_worker, dynamic=False, **compile_options(mesh.config, family))


def compile_options(config: ParallelConfig, family: str) -> dict:
    """Extra torch.compile arguments a family's parallel paths need under ``config`` (the bench
    compiles with them too)."""
    if family == "flux":
        from .models.flux_overlap import SINK_WAITS, overlaps_collectives

        if overlaps_collectives(config):
            # Else inductor waits right after each all-to-all and the work meant to overlap it waits too.
            return {"options": SINK_WAITS}
    return {}


class RankEngine:
    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh
        self.spec: ModelSpec | None = None
        self.model: torch.nn.Module | None = None
        self._denoiser = None  # the family's denoiser (FluxDenoiser, SD3Denoiser, PipeFusionFluxDenoiser, ...)
        self.family: families.ModelFamily | None = None
        self._default_shift: float | None = None
        self.load_count = 0
        self.lora_state = LoraState()
        self.lora_apply_count = 0
        self._vae_decoders: dict[str, object] = {}  # fingerprint -> VAEDecoder, most recent last
        self._lse_kernel = None
        self._lora_shards = None  # tensor parallel: the whole model's shapes, for LoRA deltas (ShardedView)
        self.last_cache_record = []  # the step cache's decisions in the last job (CacheDecision per model call)
        self.controlnets = ControlNetCache(mesh.device, lambda: flux.sequence_parallel_attention(self.mesh, self._lse_kernel))

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    def load(self, spec: ModelSpec) -> bool:
        """Load the model unless the same spec is already loaded; returns whether it loaded."""
        if spec == self.spec and self.model is not None:
            return False
        family = families.get(spec.family)
        self._check_family_supports(spec, family)
        model_config = family.read_config(spec.path)
        # Refuse degrees the model cannot take before reading any weights.
        self.mesh.config.check_model(num_heads=model_config["num_attention_heads"], family=family.display_name,
                                     num_blocks=_num_blocks(model_config))
        self.model = self._denoiser = None
        if self.mesh.size("pipefusion") > 1:
            from .pipefusion.stage import load_flux_stage

            # Only this stage's tensors are read from the file.
            model = load_flux_stage(spec.path, self._stage_plan(model_config), dtype=spec.torch_dtype, device=self.device).eval()
        elif self.mesh.size("tensor") > 1:
            from .loading.tensor_parallel import load_tensor_parallel

            # Only this rank's slices of the split weights are read from the file.
            model = load_tensor_parallel(family.name, spec.path, self.mesh.group("tensor"), dtype=spec.torch_dtype,
                                         device=self.device)
        else:
            model = family.load(spec.path, dtype=spec.torch_dtype, device=self.device).eval()
        self.set_model(model, spec)
        self.load_count += 1
        return True

    def set_model(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        """Use an already-built diffusers transformer of ``spec.family`` (scripts, tests, benchmarks)."""
        family = families.get(spec.family)
        self._check_family_supports(spec, family)
        config = model.config
        self.mesh.config.check_model(num_heads=config.num_attention_heads, family=family.display_name,
                                     num_blocks=_num_blocks(dict(config)))
        dtype = next(model.parameters()).dtype
        if self.mesh.size("pipefusion") > 1:
            from .pipefusion.runner import PipeFusionFluxDenoiser
            from .pipefusion.stage import cut_to_stage

            if spec.compile:
                raise ConfigError("compile with pipefusion_parallel_degree > 1 is not supported yet; turn the loader's "
                                  "compile off (cuda_graphs works with PipeFusion)")
            model = cut_to_stage(model, self._stage_plan(dict(config)))  # a whole model keeps only its stage
            self._denoiser = PipeFusionFluxDenoiser(model, self.mesh, dtype, has_guidance=bool(config.guidance_embeds))
            # Each stage pass (one patch, or the whole image) replays as a graph; the sends between stages stay eager.
            self._denoiser.use_cuda_graphs = spec.cuda_graphs and self.device.type == "cuda"
        elif self.mesh.size("distrifusion") > 1:
            from .distrifusion.runner import DistriFusionDenoiser

            if spec.compile or spec.cuda_graphs:
                raise ConfigError("compile and cuda_graphs with distrifusion_degree > 1 are not supported yet; "
                                  "turn them off")
            self._denoiser = DistriFusionDenoiser(family, model, self.mesh, dtype)
        else:
            if self.mesh.size("tensor") > 1:
                from .models.tensor_parallel import ShardedView, plan_for, shard_model

                # A whole model keeps only this rank's slices (a loaded one is split already).
                model = shard_model(model, plan_for(family.name), self.mesh.group("tensor"))
                self._lora_shards = ShardedView(model, plan_for(family.name)) if "lora" in family.methods else None
            kernel = None
            backend = self.mesh.config.attention_backend
            # Ring needs a kernel that returns the lse; an explicitly named backend is used for
            # every attention (auto/sdpa leave the attention without ring to SDPA's own choice).
            if self.mesh.size("ring") > 1 or backend not in ("auto", "sdpa"):
                kernel = choose_lse_kernel(backend, self.device, dtype)
            self._lse_kernel = kernel
            self._denoiser = family.build_denoiser(model, self.mesh, kernel, dtype)
            if spec.compile:
                compile_repeated_blocks(model, self.mesh, family.name)
            if spec.cuda_graphs and self.device.type == "cuda":
                from .cuda_graphs import CudaGraphForward

                self._denoiser.forward = CudaGraphForward(self._denoiser.forward)
        self._default_shift = family.default_shift(config)
        self.family = family
        self.model, self.spec = model, spec
        self.lora_state.forget()  # a new base model carries no LoRA

    def _check_family_supports(self, spec: ModelSpec, family: families.ModelFamily) -> None:
        """Refuse, before any weight is read, what the family does not support yet."""
        if spec.compile and "compile" not in family.methods:
            raise ConfigError(f"torch.compile is not supported for {family.display_name} models yet; turn the loader's compile off")
        if self.mesh.size("tensor") > 1 and "tensor" not in family.methods:
            raise ConfigError(f"tensor parallelism is not supported for {family.display_name} models yet; set "
                              "tensor_parallel_degree to 1 (use ulysses_degree, ring_degree or use_cfg_parallel instead)")
        if self.mesh.size("pipefusion") > 1 and "pipefusion" not in family.methods:
            raise ConfigError(f"PipeFusion is not supported for {family.display_name} models yet; use ulysses_degree, "
                              "ring_degree or use_cfg_parallel instead of pipefusion_parallel_degree")

        if self.mesh.size("distrifusion") > 1 and "distrifusion" not in family.methods:
            raise ConfigError(f"DistriFusion is not supported for {family.display_name} models yet; use ulysses_degree, "
                              "ring_degree or use_cfg_parallel instead of distrifusion_degree")

    def _stage_plan(self, model_config: dict):
        from .pipefusion.partition import plan_stages

        plans = plan_stages(model_config, self.mesh.size("pipefusion"), self.mesh.config.pipefusion_split)
        return plans[self.mesh.local_rank("pipefusion")]

    def set_loras(self, loras) -> bool:
        """Have exactly these LoRAs applied (in place, restorable bit for bit); True if weights changed."""
        if self.model is None:
            raise RuntimeError("no model is loaded; call load() first")
        changed = apply_loras(self.model, list(loras), self.lora_state, shards=self._lora_shards)
        self.lora_apply_count += int(changed)
        return changed

    def sample(self, request: SampleRequest, hooks: StepHooks | None = None) -> torch.Tensor:
        if self._denoiser is None:
            raise RuntimeError("no model is loaded; call load() first")
        check_sample_settings(request)
        denoiser, family = self._denoiser, self.family
        _check_request_fits(request, family, self.model.config)
        check_inputs_finite(request, self.device)
        if family.semantics == "diffusers":
            return self._sample_diffusers(request, hooks or NoHooks())
        cache = cache_job_for(request, self.model, self.mesh, self._default_shift, self.spec.family,  # refuses before any work
                              sharded_forward=getattr(denoiser, "forward", None))
        if cache and self.spec.cuda_graphs and self.device.type == "cuda":
            raise ConfigError("a step cache decides on the host at every step, which a captured CUDA graph cannot; "
                              "set the cache to none or turn the loader's cuda_graphs off")
        if cache and self.spec.compile and not getattr(cache, "works_with_compile", True):
            raise ConfigError(f"{cache.settings.describe()} switches its attention per step, which the compiled blocks "
                              "cannot trace yet; turn the loader's compile off or set the cache to none")
        self.set_loras(request.loras)
        controls = self._job_controls(request, denoiser.dtype)

        def velocity(x, sigma, cond):
            active = [(job.control, job.tokens) for job in controls if job.active_at(sigma)]
            with cache.call(cond, sigma) if cache else contextlib.nullcontext():
                return family.velocity(denoiser, x, sigma, cond, active).to(x.dtype)

        hooks = hooks or NoHooks()
        if self.mesh.size("pipefusion") > 1:  # PipeFusion: fresh caches, warmup counted in steps
            if request.controlnets:
                raise ConfigError("ControlNet with pipefusion_parallel_degree > 1 is not supported yet; "
                                  "use ulysses_degree / ring_degree for ControlNet workflows")
            denoiser.check_latent(request.latent.shape[-2])
            denoiser.start_job()
            hooks = denoiser.count_steps(hooks)
        if self.mesh.size("distrifusion") > 1:  # DistriFusion: fresh K/V state, warmup counted in steps
            if request.controlnets:
                raise ConfigError("ControlNet with distrifusion_degree > 1 is not supported yet; "
                                  "use ulysses_degree / ring_degree for ControlNet workflows")
            denoiser.start_job()
            hooks = denoiser.count_steps(hooks)

        self.last_cache_record = cache.record if cache else []
        latent = family.latent_format(self.model.config)
        with torch.inference_mode(), cache or contextlib.nullcontext():
            return run_ksampler(
                request,
                velocity,
                self.mesh,
                latent_channels=latent.channels,
                latent_dimensions=latent.dimensions,
                default_shift=self._default_shift,
                to_model_space=latent.to_model_space,
                from_model_space=latent.from_model_space,
                hooks=hooks,
                device=self.device,
                make_sampling=family.model_sampling(self.model.config),
                # One call for both CFG branches, except where a call must see one branch: the
                # step cache, PipeFusion and DistriFusion keep state per branch, ControlNet hints are per row
                # (DiTFastAttn keeps its state per call and shares across CFG inside a batched one).
                batch_cfg=((not cache or getattr(cache, "one_call_for_both_branches", False))
                           and self.mesh.size("pipefusion") == 1 and self.mesh.size("distrifusion") == 1 and not controls),
            )

    def _sample_diffusers(self, request: SampleRequest, hooks: StepHooks) -> torch.Tensor:
        """A family without ComfyUI support: its diffusers scheduler in its pipeline's loop."""
        from .caching.job import diffusers_cache_job_for
        from .sampling.diffusers_schedulers import run_diffusers_sampler, scheduler_timesteps

        family, denoiser, pipeline = self.family, self._denoiser, self.family.pipeline
        pipeline.check(request, self.model.config)
        latent = family.latent_format(self.model.config)
        scheduler_config = pipeline.scheduler_config(self.spec.path)
        cache = diffusers_cache_job_for(request, self.model, self.mesh, self.spec.family,  # refuses before any work
                                        scheduler_timesteps(scheduler_config, request.steps),
                                        sharded_forward=getattr(denoiser, "forward", None))
        if cache and self.spec.cuda_graphs and self.device.type == "cuda":
            raise ConfigError("a step cache decides on the host at every step, which a captured CUDA graph cannot; "
                              "set the cache to none or turn the loader's cuda_graphs off")

        def model_call(x, t, cond):
            with cache.call(cond, t) if cache else contextlib.nullcontext():
                return family.velocity(denoiser, x, t, cond)

        self.last_cache_record = cache.record if cache else []
        with torch.inference_mode(), cache or contextlib.nullcontext():
            return run_diffusers_sampler(
                request,
                model_call,
                self.mesh,
                pipeline=pipeline,
                scheduler_config=scheduler_config,
                latent_channels=latent.channels,
                latent_dimensions=latent.dimensions,
                from_model_space=latent.from_model_space,
                hooks=hooks,
                device=self.device,
                model_config=self.model.config,
                batch_cfg=cache is None,  # the cache keeps a state per branch: one call per branch
            )

    def _job_controls(self, request: SampleRequest, dtype: torch.dtype):
        """The request's ControlNets, loaded (or reused) and prepared for this rank's rows."""
        if not request.controlnets:
            return []
        latent = request.latent
        batch, (height, width) = latent.shape[0], latent.shape[-2:]
        sampling = flow_sampling_for(request, self._default_shift, height, width, self.family.model_sampling(self.model.config))
        return prepare_controls(request.controlnets, self.controlnets, dtype=dtype, batch=batch,
                                rows=rows_for_rank(batch, self.mesh), latent_hw=(height, width), sampling=sampling,
                                model_config=self.model.config)

    # --- VAE -------------------------------------------------------------------------------

    # Two decoders cover a workflow that alternates VAEs without keeping every VAE ever used.
    MAX_VAE_DECODERS = 2

    def has_vae(self, fingerprint: str) -> bool:
        return fingerprint in self._vae_decoders

    def load_vae(self, weights: VaeWeights) -> bool:
        from .vae import build_decoder

        if weights.fingerprint in self._vae_decoders:
            return False
        decoder = build_decoder(weights.state_dict, dtype=DTYPES[weights.dtype], device=self.device)
        self._vae_decoders[weights.fingerprint] = decoder
        while len(self._vae_decoders) > self.MAX_VAE_DECODERS:
            self._vae_decoders.pop(next(iter(self._vae_decoders)))
        return True

    def decode(self, request: VaeDecodeRequest) -> torch.Tensor:
        """Patch-parallel decode over all workers; every rank returns the whole image [B, H, W, 3]."""
        import torch.distributed as dist

        decoder = self._vae_decoders.get(request.fingerprint)
        if decoder is None:
            raise KeyError(f"VAE {request.fingerprint} is not loaded in the pool")
        group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        with torch.inference_mode():
            return decoder.decode_parallel(request.latent.to(self.device), group=group).float().cpu()


def _num_blocks(model_config: dict) -> int:
    """Transformer blocks of a model config (Flux: double + single; SD3: joint)."""
    return model_config["num_layers"] + model_config.get("num_single_layers", 0)


CONDITIONING_NAMES = {"context": "text tokens", "pooled": "pooled output", "context_t5": "mT5 tokens"}


def _check_request_fits(request: SampleRequest, family: families.ModelFamily, config) -> None:
    """Refuse a request made for another model, with what to change."""
    for which, cond in (("positive", request.positive), ("negative", request.negative)):
        if cond is None:
            continue
        if not isinstance(cond, family.conditioning):
            raise ValueError(f"the {which} conditioning is a {type(cond).__name__}, but the loaded "
                             f"{family.display_name} model takes {family.conditioning.__name__}")
        for field, width in family.conditioning_widths(config).items():
            name, tensor = CONDITIONING_NAMES[field], getattr(cond, field)
            if tensor.shape[-1] != width:
                raise ValueError(f"the {which} conditioning's {name} are {tensor.shape[-1]} wide but this "
                                 f"{family.display_name} model takes {width}: encode the prompt with the model's own "
                                 f"text encoders ({family.text_encoders})")
    latent = request.latent
    if family.max_frames is not None and latent.ndim == 5 and latent.shape[2] > family.max_frames:
        raise ValueError(f"{family.display_name} makes single images, but the latent has {latent.shape[2]} frames; "
                         "use an image latent [B, C, H, W]")
    if request.max_shift is not None and not family.resolution_shift:
        raise ValueError(f"the resolution-dependent shift (ModelSamplingFlux) does not apply to {family.display_name}; "
                         "use the model's default shift")
    if request.loras and "lora" not in family.methods:
        raise ValueError(f"LoRAs are not supported for {family.display_name} models yet; remove the Parallel LoRA Loader")
    if request.controlnets and "controlnet" not in family.methods:
        raise ValueError(f"ControlNets are not supported for {family.display_name} models yet; remove the ControlNet nodes")
