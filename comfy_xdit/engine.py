"""One rank's engine: holds the loaded model between jobs and runs the parallel sampler.

The pool creates one RankEngine per worker process; scripts and tests may create one directly
(world size 1, or inside their own process group).
"""

from __future__ import annotations

import torch

from .attention.kernels import choose_lse_kernel
from .config import ConfigError
from .lora import LoraState, apply_loras
from .mesh import ParallelMesh
from .models import flux
from .requests import DTYPES, ModelSpec, NoHooks, SampleRequest, StepHooks, VaeDecodeRequest, VaeWeights
from .controlnets import ControlNetCache
from .controlnets import prepare as prepare_controls
from .sampling.ksampler import flow_sampling_for, rows_for_rank, run_ksampler
from .sampling.schedules import FLUX_DEV_SHIFT, FLUX_SCHNELL_SHIFT

SUPPORTED_FAMILIES = ("flux",)


def compile_repeated_blocks(model: torch.nn.Module, mesh: ParallelMesh) -> None:
    """torch.compile each transformer block class once (diffusers' regional compile).

    Regional rather than whole-model: the blocks are identical, so one compiled graph serves all
    of them and the compile takes seconds instead of minutes. With a sequence-parallel group the
    collectives inside attention may break the graph, so fullgraph is only asked for on one worker.
    Shapes are static per resolution: a new resolution compiles once more, a new seed or prompt
    of the same shape reuses the graphs.
    """
    single_worker = mesh.size("ulysses") * mesh.size("ring") == 1
    model.compile_repeated_blocks(fullgraph=single_worker, dynamic=False)


class RankEngine:
    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh
        self.spec: ModelSpec | None = None
        self.model: torch.nn.Module | None = None
        self._denoiser: flux.FluxDenoiser | None = None
        self._default_shift = FLUX_DEV_SHIFT
        self.load_count = 0
        self.lora_state = LoraState()
        self.lora_apply_count = 0
        self._vae_decoders: dict[str, object] = {}  # fingerprint -> VAEDecoder, most recent last
        self._lse_kernel = None
        self.controlnets = ControlNetCache(mesh.device, lambda: flux.sequence_parallel_attention(self.mesh, self._lse_kernel))

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    def load(self, spec: ModelSpec) -> bool:
        """Load the model unless the same spec is already loaded; returns whether it loaded."""
        if spec == self.spec and self.model is not None:
            return False
        if spec.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model family {spec.family!r} is not supported yet; supported: {', '.join(SUPPORTED_FAMILIES)}")
        from .loading.flux import load_flux_transformer, read_flux_config

        model_config = read_flux_config(spec.path)
        # Refuse degrees the model cannot take before reading any weights.
        self.mesh.config.check_model(num_heads=model_config["num_attention_heads"], family="Flux",
                                     num_blocks=model_config["num_layers"] + model_config["num_single_layers"])
        self.model = self._denoiser = None
        if self.mesh.size("pipefusion") > 1:
            from .pipefusion.stage import load_flux_stage

            # Only this stage's tensors are read from the file.
            model = load_flux_stage(spec.path, self._stage_plan(model_config), dtype=spec.torch_dtype, device=self.device).eval()
        else:
            model = load_flux_transformer(spec.path, dtype=spec.torch_dtype, device=self.device).eval()
        self.set_model(model, spec)
        self.load_count += 1
        return True

    def set_model(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        """Use an already-built diffusers Flux transformer (scripts, tests, benchmarks)."""
        config = model.config
        self.mesh.config.check_model(num_heads=config.num_attention_heads, family="Flux",
                                     num_blocks=config.num_layers + config.num_single_layers)
        dtype = next(model.parameters()).dtype
        if self.mesh.size("pipefusion") > 1:
            from .pipefusion.runner import PipeFusionFluxDenoiser
            from .pipefusion.stage import cut_to_stage

            if spec.compile or spec.cuda_graphs:
                raise ConfigError("compile and cuda_graphs with pipefusion_parallel_degree > 1 are not supported yet; "
                                  "turn them off")
            model = cut_to_stage(model, self._stage_plan(dict(config)))  # a whole model keeps only its stage
            self._denoiser = PipeFusionFluxDenoiser(model, self.mesh, dtype, has_guidance=bool(config.guidance_embeds))
        else:
            kernel = None
            if self.mesh.size("ring") > 1:
                kernel = choose_lse_kernel(self.mesh.config.attention_backend, self.device, dtype)
            self._lse_kernel = kernel
            forward = flux.install_sequence_parallel(model, self.mesh, kernel)
            if spec.compile:
                compile_repeated_blocks(model, self.mesh)
            if spec.cuda_graphs and self.device.type == "cuda":
                from .cuda_graphs import CudaGraphForward

                forward = CudaGraphForward(forward)
            self._denoiser = flux.FluxDenoiser(forward, dtype, has_guidance=bool(config.guidance_embeds),
                                               controlled=flux.controlled_forward(model, self.mesh))
        # Flux-schnell (no guidance embedder) was distilled for an unshifted schedule.
        self._default_shift = FLUX_DEV_SHIFT if config.guidance_embeds else FLUX_SCHNELL_SHIFT
        self.model, self.spec = model, spec
        self.lora_state.forget()  # a new base model carries no LoRA

    def _stage_plan(self, model_config: dict):
        from .pipefusion.partition import plan_stages

        return plan_stages(model_config, self.mesh.size("pipefusion"))[self.mesh.local_rank("pipefusion")]

    def set_loras(self, loras) -> bool:
        """Have exactly these LoRAs applied (in place, restorable bit for bit); True if weights changed."""
        if self.model is None:
            raise RuntimeError("no model is loaded; call load() first")
        changed = apply_loras(self.model, list(loras), self.lora_state)
        self.lora_apply_count += int(changed)
        return changed

    def sample(self, request: SampleRequest, hooks: StepHooks | None = None) -> torch.Tensor:
        if self._denoiser is None:
            raise RuntimeError("no model is loaded; call load() first")
        denoiser = self._denoiser
        self.set_loras(request.loras)
        controls = self._job_controls(request, denoiser.dtype)

        def velocity(x, sigma, cond):
            active = [(job.control, job.tokens) for job in controls if job.active_at(sigma)]
            return denoiser(x, sigma, cond.context, cond.pooled, cond.guidance, active).to(x.dtype)

        hooks = hooks or NoHooks()
        if not isinstance(denoiser, flux.FluxDenoiser):  # PipeFusion: fresh caches, warmup counted in steps
            if request.controlnets:
                raise ConfigError("ControlNet with pipefusion_parallel_degree > 1 is not supported yet; "
                                  "use ulysses_degree / ring_degree for ControlNet workflows")
            denoiser.check_latent(request.latent.shape[-2])
            denoiser.start_job()
            hooks = denoiser.count_steps(hooks)

        with torch.inference_mode():
            return run_ksampler(
                request,
                velocity,
                self.mesh,
                latent_channels=flux.LATENT_CHANNELS,
                default_shift=self._default_shift,
                to_model_space=flux.latent_to_model_space,
                from_model_space=flux.latent_from_model_space,
                hooks=hooks,
                device=self.device,
            )

    def _job_controls(self, request: SampleRequest, dtype: torch.dtype):
        """The request's ControlNets, loaded (or reused) and prepared for this rank's rows."""
        if not request.controlnets:
            return []
        latent = request.latent
        batch, (height, width) = latent.shape[0], latent.shape[-2:]
        sampling = flow_sampling_for(request, self._default_shift, height, width)
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
