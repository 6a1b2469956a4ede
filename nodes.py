"""comfy_xdit's ComfyUI nodes (V3 schema). Thin: every decision lives in comfy_xdit.bridge.

Nothing heavy is imported at module level, so ComfyUI starts as fast with the pack as without.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

XditModelType = io.Custom("XDIT_MODEL")

CATEGORY = "comfy_xdit"
DTYPES = ["default", "bfloat16", "float16", "float32"]
SHIFT_MODES = ["model default", "resolution (ModelSamplingFlux)"]
CHECKPOINT_PREFIX = "checkpoints/"
CACHE_CHOICES = ["none", "fbcache", "teacache", "ditfastattn"]


def _bridge():
    """The engine's bridge, imported on first use (the engine is a subpackage of this pack)."""
    from .comfy_xdit import bridge

    return bridge


def _model_files() -> list[str]:
    import folder_paths

    unets = [f for f in folder_paths.get_filename_list("diffusion_models") if f.endswith(".safetensors")]
    checkpoints = [CHECKPOINT_PREFIX + f for f in folder_paths.get_filename_list("checkpoints") if f.endswith(".safetensors")]
    return unets + checkpoints


def _folder_file(input_name: str, folder: str, name: str, listed: list[str], prefix: str = "") -> str:
    """The full path of a listed file of a model folder; '..', absolute and unlisted names are refused."""
    import folder_paths

    from .comfy_xdit.file_names import check_file_name

    check_file_name(input_name, folder, name, [prefix + f for f in listed])
    return folder_paths.get_full_path_or_raise(folder, name[len(prefix):])


def _model_path(name: str) -> str:
    import folder_paths

    # Only names from the lists above resolve, and only inside the model folders.
    if name.startswith(CHECKPOINT_PREFIX):
        return _folder_file("model_name", "checkpoints", name, folder_paths.get_filename_list("checkpoints"), CHECKPOINT_PREFIX)
    return _folder_file("model_name", "diffusion_models", name, folder_paths.get_filename_list("diffusion_models"))


class ParallelLoader(io.ComfyNode):
    """Load a DiT (Flux.1, Stable Diffusion 3 / 3.5, Wan 2.1 / 2.2 text-to-video, Qwen-Image, HunyuanVideo 1.0 text-to-video, DiT-XL-2, CogVideoX, HunyuanDiT, Latte; detected from the file) once into a persistent multi-GPU worker pool."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from .comfy_xdit.config import ATTENTION_BACKENDS, PIPEFUSION_SPLITS

        return io.Schema(
            node_id="ParallelLoader",
            display_name="Parallel Loader (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[
                io.Combo.Input("model_name", options=_model_files(), tooltip="a Flux.1, SD3/SD3.5, PixArt-alpha/Sigma, Wan 2.1/2.2 T2V, Qwen-Image, HunyuanVideo 1.0 T2V, DiT-XL-2 or HunyuanDiT .safetensors from diffusion_models (unet) or checkpoints; for a diffusers folder (DiT-XL-2, CogVideoX, Latte) pick a weights file in its transformer/; the family is detected from the file"),
                io.Combo.Input("weight_dtype", options=DTYPES, default="default", tooltip="default: bfloat16 on GPUs, float32 on CPU workers"),
                io.Int.Input("ulysses_degree", default=0, min=0, max=64, tooltip="0: all workers the other degrees leave"),
                io.Int.Input("ring_degree", default=1, min=1, max=64),
                io.Boolean.Input("use_cfg_parallel", default=False, tooltip="conditional and unconditional branch on two worker groups (needs cfg > 1)"),
                io.Int.Input("data_parallel_degree", default=1, min=1, max=64, tooltip="split the batch over this many worker groups"),
                io.Int.Input("pipefusion_parallel_degree", default=1, min=1, max=64, tooltip="PipeFusion: the transformer's layers split over this many worker groups (each holds about 1/N of the weights); approximate after warmup_steps"),
                io.String.Input("devices", default="auto", tooltip="auto (all GPUs the degrees need, or 2 CPU workers) or e.g. cuda:0,cuda:1"),
                io.Combo.Input("attention_backend", options=list(ATTENTION_BACKENDS), default="auto"),
                io.Boolean.Input("compile", default=False, tooltip="torch.compile the transformer blocks: the first prompt of each "
                                 "resolution compiles (tens of seconds), later ones run faster"),
                # Optional and last, so workflows saved before they existed still load unchanged.
                io.Int.Input("num_pipeline_patches", default=0, min=0, max=64, optional=True, tooltip="PipeFusion: image patches (bands of rows) flowing through the pipeline; 0: the pipefusion degree"),
                io.Int.Input("warmup_steps", default=1, min=0, max=10000, optional=True, tooltip="PipeFusion and DistriFusion: the first steps run exactly (whole image per stage, or all K/V exchanged synchronously); later steps reuse one-step-stale attention K/V of the other patches"),
                io.Boolean.Input("cuda_graphs", default=False, optional=True, tooltip="GPU workers: replay each step as a captured CUDA "
                                 "graph (removes kernel-launch time; the first step of each shape captures)"),
                io.Combo.Input("backend", options=["local", "ray"], default="local", optional=True,
                               tooltip="local: worker processes on this machine; ray: Ray actors on a Ray cluster (pip install ray)"),
                io.String.Input("address", default="auto", optional=True,
                                tooltip="ray: auto (this machine's Ray cluster), ray://HOST:10001 or local. local: auto for one "
                                        "machine, or HOST:PORT to be node 0 of several machines (README: several machines)"),
                io.Int.Input("tensor_parallel_degree", default=1, min=1, max=64, optional=True,
                             tooltip="tensor parallel: attention heads and MLP columns split over this many workers (each "
                                     "holds about 1/N of the block weights, one all-reduce per attention and MLP); combines "
                                     "with use_cfg_parallel and data_parallel_degree, not with ulysses/ring/pipefusion"),
                io.Int.Input("distrifusion_degree", default=1, min=1, max=64, optional=True,
                             tooltip="DistriFusion: every worker holds the whole model and denoises its patch of the image, "
                                     "attending to the other patches' one-step-stale K/V (exchanged asynchronously); exact "
                                     "during warmup_steps, approximate after. Combines with use_cfg_parallel and "
                                     "data_parallel_degree, not with ulysses/ring/pipefusion/tensor"),
                io.Combo.Input("pipefusion_split", options=list(PIPEFUSION_SPLITS), default="auto", optional=True,
                               tooltip="PipeFusion: how the layers are split over the stages. auto (default): interleaved "
                                       "where every GPU can hold a double and a single block (Flux up to 19 stages), else "
                                       "parameters. parameters: every GPU holds "
                                       "about the same weight memory (fits the largest model), but the stages after Flux's "
                                       "double blocks do most of the work (N=2: the last ~70%), so the pipeline waits on "
                                       "them. compute: equal block counts, so about equal time per stage, but the stage "
                                       "with the double blocks holds more weights (Flux N=2: about 2/3). interleaved: "
                                       "both even, each GPU holds 1/N of the double and 1/N of the single blocks, and "
                                       "each patch passes the GPUs twice"),
            ],
            outputs=[XditModelType.Output()],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype, ulysses_degree, ring_degree, use_cfg_parallel, data_parallel_degree,
                pipefusion_parallel_degree, devices, attention_backend, compile=False, num_pipeline_patches=0,
                warmup_steps=1, cuda_graphs=False, backend="local", address="auto", tensor_parallel_degree=1,
                distrifusion_degree=1, pipefusion_split="auto") -> io.NodeOutput:
        from .comfy_xdit.requests import ModelSpec

        bridge = _bridge()
        pool_backend = bridge.make_backend(backend, address)
        config = bridge.make_config(
            ulysses_degree=ulysses_degree, ring_degree=ring_degree, use_cfg_parallel=use_cfg_parallel,
            data_parallel_degree=data_parallel_degree, pipefusion_parallel_degree=pipefusion_parallel_degree,
            attention_backend=attention_backend, devices=devices, backend=pool_backend,
            num_pipeline_patches=num_pipeline_patches or None, warmup_steps=warmup_steps,
            tensor_parallel_degree=tensor_parallel_degree, distrifusion_degree=distrifusion_degree,
            pipefusion_split=pipefusion_split,
        )
        if weight_dtype == "default":
            weight_dtype = "float32" if config.device_type == "cpu" else "bfloat16"
        path = _model_path(model_name)
        model = bridge.XditModel(ModelSpec(path, bridge.detect_family(path), weight_dtype, compile=compile,
                                           cuda_graphs=cuda_graphs), config, backend=pool_backend)
        bridge.load(model)
        return io.NodeOutput(model)


class ParallelLoraLoader(io.ComfyNode):
    """Add a LoRA to a parallel model; applied in the pool without reloading the base model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        loras = [f for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors")]
        return io.Schema(
            node_id="ParallelLoraLoader",
            display_name="Parallel LoRA Loader (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[
                XditModelType.Input("model"),
                io.Combo.Input("lora_name", options=loras),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
            ],
            outputs=[XditModelType.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model) -> io.NodeOutput:
        import folder_paths

        path = _folder_file("lora_name", "loras", lora_name, folder_paths.get_filename_list("loras"))
        _bridge().check_lora(model, path, strength_model)  # refuse a foreign LoRA here
        return io.NodeOutput(model.with_lora(path, strength_model) if strength_model != 0 else model)


XditControlNetType = io.Custom("XDIT_CONTROL_NET")


class ParallelControlNetLoader(io.ComfyNode):
    """Pick a Flux ControlNet (InstantX/Shakker-Labs or XLabs); the pool loads it once and keeps it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        files = [f for f in folder_paths.get_filename_list("controlnet") if f.endswith((".safetensors", ".sft"))]
        return io.Schema(
            node_id="ParallelControlNetLoader",
            display_name="Parallel ControlNet Loader (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[io.Combo.Input("control_net_name", options=files, tooltip="a Flux ControlNet .safetensors from models/controlnet")],
            outputs=[XditControlNetType.Output()],
        )

    @classmethod
    def execute(cls, control_net_name) -> io.NodeOutput:
        import folder_paths

        path = _folder_file("control_net_name", "controlnet", control_net_name, folder_paths.get_filename_list("controlnet"))
        return io.NodeOutput(_bridge().open_controlnet(path))  # refuses a non-Flux ControlNet by name


class ParallelControlNetApply(io.ComfyNode):
    """Apply a Flux ControlNet to a parallel model, to positive and negative alike (as ControlNetApplyAdvanced does)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from comfy.cldm.control_types import UNION_CONTROLNET_TYPES

        return io.Schema(
            node_id="ParallelControlNetApply",
            display_name="Parallel ControlNet Apply (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[
                XditModelType.Input("model"),
                XditControlNetType.Input("control_net"),
                io.Image.Input("image"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Vae.Input("vae", optional=True, tooltip="the Flux VAE: InstantX/Shakker-Labs ControlNets take the control image VAE-encoded"),
                io.Combo.Input("union_type", options=["auto", *UNION_CONTROLNET_TYPES], default="auto",
                               tooltip="union ControlNets: the control type, as SetUnionControlNetType sets it"),
            ],
            outputs=[XditModelType.Output()],
        )

    @classmethod
    def execute(cls, model, control_net, image, strength, start_percent, end_percent, vae=None, union_type="auto") -> io.NodeOutput:
        from comfy.cldm.control_types import UNION_CONTROLNET_TYPES

        if strength == 0:  # stock ControlNetApplyAdvanced leaves the conditioning unchanged too
            return io.NodeOutput(model)
        if control_net.needs_vae and vae is None:
            raise ValueError(f"this ControlNet ({control_net.kind} layout) takes a VAE-encoded control image: connect "
                             "the Flux VAE (VAELoader) to the vae input")
        mode = UNION_CONTROLNET_TYPES.get(union_type)
        if mode is not None and control_net.num_modes and mode >= control_net.num_modes:
            raise ValueError(f"union_type {union_type!r} is mode {mode}, but this ControlNet has {control_net.num_modes} modes")
        bridge = _bridge()
        use = bridge.ControlNetUse(control_net, image, float(strength), float(start_percent), float(end_percent),
                                   vae if control_net.needs_vae else None, mode)
        return io.NodeOutput(model.with_controlnet(use))


class ParallelSampler(io.ComfyNode):
    """KSampler on all workers of the pool: same seeds, samplers and schedulers as the stock KSampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from .comfy_xdit.sampling.samplers import SAMPLERS
        from .comfy_xdit.sampling.schedules import SCHEDULERS

        return io.Schema(
            node_id="ParallelSampler",
            display_name="Parallel Sampler (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[
                XditModelType.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Flux-dev and HunyuanVideo: 1 (guidance comes from the conditioning: FluxGuidance); SD3/SD3.5 and PixArt: about 4-5; Wan: about 5-6; Qwen-Image: about 2.5-4"),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="simple"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("shift", options=SHIFT_MODES, default=SHIFT_MODES[0], tooltip="resolution: what ModelSamplingFlux does (Flux only; SD3 uses its default shift 3.0, Wan 8.0, Qwen-Image 1.15, HunyuanVideo 7.0)"),
                io.Float.Input("max_shift", default=1.15, min=0.0, max=100.0, step=0.01),
                io.Float.Input("base_shift", default=0.5, min=0.0, max=100.0, step=0.01),
                io.Combo.Input("cache", options=CACHE_CHOICES, default="none", optional=True,
                               tooltip="skip most of the model on steps where it barely changes: fbcache (First-Block-Cache) "
                               "or teacache (Flux, Wan); ditfastattn compresses attention per layer and step (Flux, PixArt); "
                               "the same decision on every worker"),
                io.Float.Input("cache_threshold", default=0.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="0: the default (fbcache 0.08; teacache 0.4 on Flux, 0.05 / 0.10 on Wan 1.3B / 14B; "
                               "ditfastattn 0.1); higher skips more"),
            ],
            outputs=[io.Latent.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                shift, max_shift, base_shift, cache="none", cache_threshold=0.0) -> io.NodeOutput:
        from .comfy_xdit.caching.settings import settings_from_choice

        if denoise <= 0:
            raise ValueError("denoise must be above 0; use a value in (0, 1]")
        resolution_shift = shift == SHIFT_MODES[1]
        latent = _bridge().sample(
            model, positive=positive, negative=negative, latent=latent_image, seed=seed, steps=steps, cfg=cfg,
            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            max_shift=max_shift if resolution_shift else None, base_shift=base_shift if resolution_shift else None,
            node_id=cls.hidden.unique_id, cache=settings_from_choice(cache, cache_threshold),
        )
        return io.NodeOutput(latent)


class ParallelClassLabel(io.ComfyNode):
    """Class conditioning for class-conditional DiTs (DiT-XL-2): an ImageNet class id as positive, DiT's null class 1000 as negative."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelClassLabel",
            display_name="Parallel Class Label (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[io.Int.Input("class_id", default=207, min=0, max=999, tooltip="ImageNet-1k class id (207: golden retriever, 88: macaw, 360: otter)")],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, class_id) -> io.NodeOutput:
        bridge = _bridge()
        return io.NodeOutput(bridge.class_label_conditioning(class_id), bridge.class_label_conditioning(bridge.DIT_NULL_CLASS))


class ParallelVAEDecode(io.ComfyNode):
    """Decode latents with the stock VAE, image rows split over the pool's workers (distvae)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelVAEDecode",
            display_name="Parallel VAE Decode (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[io.Latent.Input("samples"), io.Vae.Input("vae")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        return io.NodeOutput(_bridge().vae_decode(vae, samples))


class ParallelFolderVAEDecode(io.ComfyNode):
    """Decode a CogVideoX, ConsisID or Latte video latent with the VAE of the model's own diffusers folder (vae/ beside transformer/), as the model's diffusers pipeline decodes; gives the frames."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelFolderVAEDecode",
            display_name="Parallel Folder VAE Decode (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[io.Latent.Input("samples"),
                    XditModelType.Input("model", tooltip="the Parallel Loader's model: its diffusers folder's vae/ decodes"),
                    io.Boolean.Input("tiled", default=True, tooltip="diffusers' tiled decode: less memory on large frames "
                                     "(as the CogVideoX pipelines recommend); small frames decode whole either way")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, model, tiled=True) -> io.NodeOutput:
        return io.NodeOutput(_bridge().folder_vae_decode(model, samples, tiled))


CONSISID_IDENTITY_FOLDER = "consisid_identity"  # models/consisid_identity: identity files (README, ConsisID)


def _identity_files() -> list[str]:
    import os

    import folder_paths

    if CONSISID_IDENTITY_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CONSISID_IDENTITY_FOLDER, os.path.join(folder_paths.models_dir, CONSISID_IDENTITY_FOLDER))
    return [f for f in folder_paths.get_filename_list(CONSISID_IDENTITY_FOLDER) if f.endswith(".safetensors")]


class ParallelConsisIDIdentity(io.ComfyNode):
    """ConsisID's face identity: attaches the identity file (id_cond + EVA-CLIP hidden states, see the README) and the face image (VAE-encoded with the model folder's vae/, as ConsisIDPipeline does) to the T5 prompts, and makes the empty video latent."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelConsisIDIdentity",
            display_name="Parallel ConsisID Identity (xDiT)",
            category=CATEGORY,
            description=cls.__doc__,
            inputs=[XditModelType.Input("model", tooltip="the Parallel Loader's ConsisID: its diffusers folder's vae/ encodes the face"),
                    io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                    io.Image.Input("face_image", tooltip="the aligned face crop that process_face_embeddings_infer returned (LoadImage)"),
                    io.Combo.Input("identity", options=_identity_files(),
                                   tooltip="models/consisid_identity/*.safetensors: id_cond and id_vit_hidden.0..4 of the same face"),
                    io.Int.Input("width", default=720, min=16, max=4096, step=16),
                    io.Int.Input("height", default=480, min=16, max=4096, step=16),
                    io.Int.Input("length", default=49, min=1, max=1024, step=4, tooltip="video frames (1 + 4k)"),
                    io.Int.Input("batch_size", default=1, min=1, max=64)],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, negative, face_image, identity, width, height, length, batch_size) -> io.NodeOutput:
        path = _folder_file("identity", CONSISID_IDENTITY_FOLDER, identity, _identity_files())
        return io.NodeOutput(*_bridge().consisid_identity(model, positive, negative, face_image, path, width=width,
                                                          height=height, length=length, batch_size=batch_size))


NODES = [ParallelLoader, ParallelLoraLoader, ParallelControlNetLoader, ParallelControlNetApply, ParallelSampler,
         ParallelVAEDecode, ParallelClassLabel, ParallelFolderVAEDecode, ParallelConsisIDIdentity]


class XditExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .status_routes import register_routes

        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
