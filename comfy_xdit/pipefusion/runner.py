"""PipeFusion for Flux: the stages of one pipeline evaluate the transformer patch by patch.

Every rank runs the same ComfyUI sampler (so all samplers, their noise and CFG stay exact) and
calls this denoiser for each model evaluation. Inside one evaluation:

- The image tokens are split into M patches: bands of whole token rows, as even as possible
  (the first bands one row taller). With Ulysses and/or Ring inside a stage each patch is
  further split over the stage's ring x Ulysses ranks (padded at its end to divide).
- Stage 0 embeds patch m (and the text), runs its blocks and sends text + patch hidden states
  to stage 1 with a non-blocking send, then starts on patch m+1 while stage 1 works on patch
  m; a stage posts its receives for all patches before its first pass. The last stage applies
  the output layers.
- With the interleaved split a stage holds two runs of blocks (partition.py). Each patch then
  passes the stages twice: after the first run the last stage sends it back to stage 0 for the
  second (through a group of its own, see mesh.py), and a stage posts a run's receives when it
  starts that run.
- Text tokens ride along with every patch (their hidden states travel with it from stage to
  stage), so every patch's pass is a full forward of text + patch tokens in which the other
  patches' image keys/values are the cached ones (see attention.py). xDiT's SD3 pipeline
  instead forwards the text states of patch 0 only; carrying them with every patch costs one
  text-sized message per patch and keeps each pass self-consistent.
- The last stage's output for the whole image is broadcast over the pipefusion group (and
  gathered over Ulysses and Ring), so the sampler step is identical on every rank.

Warmup: a model evaluation is synchronous (one patch = the whole image, exact, and it fills the
caches) while fewer than ``warmup_steps`` sampler steps have completed, and for the first
evaluation of each conditioning branch (positive, negative) in a job, which has no cache yet.
Sampler steps are counted by the sampler's per-step callback, so a step of a two-evaluation
sampler (heun, dpm_2, ...) counts once. After warmup each patch pass sees keys/values of the
other patches that are one evaluation of its branch stale.

The pipeline drains at the end of every evaluation (the sampler needs the whole velocity before
the next step), so each evaluation has a bubble of N-1 patch times; pipelining across steps as
xDiT's async pipeline does would remove it but needs the sampler on the last stage only.

Cost: a stage launches all of its layers' kernels once per patch, M times per evaluation; with
cuda_graphs each stage pass (one patch, or the whole image) replays as one CUDA graph, the sends
between stages staying eager, outside the graphs. The pipeline runs at the pace of its slowest
stage (partition.py's pipefusion_split: by parameters, Flux-dev's last stage does 70% of the
compute; docs/performance.md run O measured 0.99x one GPU with graphs; the compute and
interleaved splits even it out). Even with even stages a
stage does more than 1/N of one GPU's work: the 512 text tokens ride along with every patch, so
it processes M x (patch + text) tokens (M=2: about 11% more linear work than its share of the
whole image), plus a bubble of one patch time per evaluation at N=2: about 0.83 of one GPU's
step time, some 1.2x, expected for the compute split at N=2, M=2.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.kernels import choose_lse_kernel
from ..attention.usp import SequenceLayout
from ..config import ConfigError
from ..even_split import even_bands
from ..models.flux import PATCH, ParallelFluxAttnProcessor, image_ids, pack, unpack
from ..models.sharding import pad_to_multiple
from .attention import KVCacheStore, PatchWindow, PatchWindowState, StaleKVAttention
from .stage import project_output, run_blocks, time_embedding


def token_row_bands(rows: int, patches: int) -> list[tuple[int, int]]:
    """(first row, row count) of each patch: contiguous bands, the first ones a row taller."""
    if patches > rows:
        raise ConfigError(
            f"num_pipeline_patches={patches} is more than the {rows} token rows of this latent "
            f"(latent height / 2); use at most {rows} patches or a taller image"
        )
    return even_bands(rows, patches)


class StepCounter:
    """Forwards the sampler's step hooks and tells the denoiser how many steps have completed."""

    def __init__(self, hooks, denoiser: "PipeFusionFluxDenoiser"):
        self.hooks = hooks
        self.denoiser = denoiser

    def on_step(self, step: int, total: int, preview) -> None:
        self.denoiser.completed_steps = step
        self.hooks.on_step(step, total, preview)

    def cancel_requested(self) -> bool:
        return self.hooks.cancel_requested()


class PipeFusionFluxDenoiser:
    """Drop-in for FluxDenoiser on a PipeFusion mesh: x [B, 16, H, W] in model space -> v."""

    def __init__(self, stage, mesh, dtype: torch.dtype, has_guidance: bool):
        config = mesh.config
        self.stage = stage
        self.plan = stage.pipefusion_stage
        self.dtype = dtype
        self.has_guidance = has_guidance
        self.patches = config.pipeline_patches
        self.warmup_steps = config.warmup_steps
        # Diagnostic switch: False attends only to each patch's own image tokens (no stale K/V).
        self.attend_stale = True

        self.group = mesh.group("pipefusion")
        # The interleaved split's hand-overs from the last stage back to stage 0 (mesh.py says why
        # they have a group of their own).
        self.return_group = mesh.pipefusion_return_group
        to_global = lambda i: dist.get_global_rank(self.group, i)  # noqa: E731
        self.previous_rank = to_global((self.plan.index - 1) % self.plan.count)
        self.next_rank = to_global((self.plan.index + 1) % self.plan.count)
        self.last_rank = to_global(self.plan.count - 1)
        self.last_virtual_stage = len(self.plan.runs) * self.plan.count - 1
        self.ulysses_group = mesh.group("ulysses")
        self.ulysses_degree = mesh.size("ulysses")
        self.ulysses_rank = mesh.local_rank("ulysses")
        self.ring_group = mesh.group("ring")
        self.ring_degree = mesh.size("ring")
        # A patch's tokens are split over the stage's ring x ulysses ranks (ring-major).
        self.sequence_degree = self.ring_degree * self.ulysses_degree
        self.sequence_rank = mesh.sequence_parallel_rank
        # Ring merges its blocks through their log-sum-exp: it needs a kernel that returns it.
        lse_kernel = choose_lse_kernel(config.attention_backend, mesh.device, dtype) if self.ring_degree > 1 else None

        # The K/V cache of a layer holds every image token for this rank's heads (after Ulysses).
        self.cache_heads = stage.config.num_attention_heads // self.ulysses_degree
        self.head_dim = stage.config.attention_head_dim
        # Replay each stage pass as a CUDA graph (the engine turns it on for cuda_graphs on a GPU).
        self.use_cuda_graphs = False
        self._graph_pool = None  # one memory pool for all of this stage's pass graphs

        self.window_state = PatchWindowState()
        names = list(stage.attn_processors)
        self.kv_store = KVCacheStore(len(names))
        stage.set_attn_processor({
            name: ParallelFluxAttnProcessor(
                StaleKVAttention(self.window_state, self.kv_store, index, self.ulysses_group, self.ring_group, lse_kernel))
            for index, name in enumerate(names)
        })
        self.start_job()

    # --- job bookkeeping ---------------------------------------------------------------------

    def start_job(self) -> None:
        """A new job: step count zero, no branch seen, no cache filled by this job.

        The caches themselves (and the graphs captured against them) are kept: each branch's first
        evaluation in the job is a whole-image pass, which overwrites every cached entry before any
        is read, so nothing of the previous job is ever attended to.
        """
        self.completed_steps = 0
        self._filled: set[int] = set()
        self._slots: dict[int, int] = {}  # id(context) -> cache slot, in the order the job meets them

    def count_steps(self, hooks) -> StepCounter:
        return StepCounter(hooks, self)

    def check_latent(self, height: int) -> None:
        """Refuse a latent with fewer token rows than patches (before any work)."""
        token_row_bands((height + PATCH - 1) // PATCH, self.patches)

    # --- one model evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, guidance: float | None,
                 controls=()) -> torch.Tensor:
        if controls:  # the engine refuses ControlNet with PipeFusion before sampling
            raise ConfigError("ControlNet with pipefusion_parallel_degree > 1 is not supported yet")
        # One cache slot per conditioning branch, numbered in the order the job first evaluates
        # them: the sampler passes the same context tensor for a branch at every evaluation of a
        # job. Slots (not tensor ids) name the caches, so they and their graphs outlive the job.
        slot = self._slots.setdefault(id(context), len(self._slots))
        b, c, h, w = x.shape
        pad_h, pad_w = -h % PATCH, -w % PATCH
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")  # as ComfyUI (see FluxDenoiser)
        hp, wp = x.shape[-2:]
        rows, cols = hp // PATCH, wp // PATCH
        device = x.device
        tokens = pack(x).to(self.dtype)
        context = context.to(device, self.dtype).expand(b, -1, -1)
        pooled = pooled.to(device, self.dtype).expand(b, -1)
        guidance_vec = None
        if self.has_guidance:
            guidance_vec = torch.full((b,), 3.5 if guidance is None else float(guidance), device=device, dtype=torch.float32)
        temb = time_embedding(self.stage, sigma.expand(b).to(device, torch.float32), pooled, guidance_vec, self.dtype)
        img_ids = image_ids(rows, cols, torch.float32, device)
        txt_ids = torch.zeros(context.shape[1], 3, dtype=torch.float32, device=device)

        # Allocated (or kept) before any pass: a captured pass must find the cache where it was.
        self.kv_store.ensure(slot, (b, rows * cols, self.cache_heads, self.head_dim), self.dtype, device)
        synchronous = self.completed_steps < self.warmup_steps or slot not in self._filled
        bands = [(0, rows)] if synchronous else token_row_bands(rows, self.patches)
        windows = [
            PatchWindow(start * cols, count * cols, rows * cols, slot, self.attend_stale or synchronous)
            for start, count in bands
        ]
        out = self._pipeline(windows, tokens, context, temb, img_ids, txt_ids)
        self._filled.add(slot)
        return unpack(out.float(), c, hp, wp)[:, :, :h, :w]

    def _shard(self, x: torch.Tensor, dim: int, window: PatchWindow) -> torch.Tensor:
        """This rank's ring x Ulysses shard of the patch's tokens along ``dim`` (padded at the end)."""
        part = x.narrow(dim, window.start, window.tokens)
        if self.sequence_degree == 1:
            return part
        return pad_to_multiple(part, dim, self.sequence_degree).chunk(self.sequence_degree, dim=dim)[self.sequence_rank]

    def _pipeline(self, windows, tokens, context, temb, img_ids, txt_ids) -> torch.Tensor:
        stage, plan = self.stage, self.plan
        shards = [-(-w.tokens // self.sequence_degree) for w in windows]
        text_embedded = stage.context_embedder(context) if plan.is_first else None
        rotary = [stage.pos_embed(torch.cat([txt_ids, self._shard(img_ids, 0, window)])) for window in windows]
        sends, outputs = [], []
        for run in range(len(plan.runs)):
            virtual = plan.virtual_stage(run)
            # Post the run's receives before its first pass: patch m+1 arrives while this stage
            # computes patch m. Not earlier: a receive from the last stage back to stage 0 posted
            # at the start would make stage 0 wait for a stage that waits for stage 0's sends.
            receives = [] if virtual == 0 else self._post_receives(virtual, shards, context.shape[:2], tokens)
            for i, window in enumerate(windows):
                if virtual == 0:
                    inputs = dict(image=self._shard(tokens, 1, window), text=text_embedded)
                else:
                    buffer, work = receives[i]
                    work.wait()
                    inputs = dict(received=buffer)
                cos, sin = rotary[i]
                out = self._pass(window, run)(temb=temb, cos=cos, sin=sin, **inputs)
                if virtual == self.last_virtual_stage:
                    outputs.append(out)
                else:
                    # A graph's output is a copy (CudaGraphForward clones it), so the next replay cannot
                    # overwrite what this send still reads; every send is waited before returning.
                    returning = plan.is_last  # the next virtual stage is stage 0's next run
                    work = dist.isend(out, dst=self.next_rank, group=self.return_group if returning else self.group,
                                      tag=(virtual + 1) * len(windows) + i)
                    sends.append((out, work))
        for _, work in sends:
            work.wait()
        return self._whole_output(outputs, windows, shards, context.shape[0], tokens)

    def _post_receives(self, virtual: int, shards: list[int], batch_and_text: tuple[int, int], like: torch.Tensor) -> list:
        """Non-blocking receives of every patch's hidden states (text + patch) for a virtual stage."""
        batch, text_len = batch_and_text
        returning = self.plan.is_first  # from the last stage's previous run
        group = self.return_group if returning else self.group
        receives = []
        for i, shard in enumerate(shards):
            buffer = like.new_empty(batch, text_len + shard, self.stage.inner_dim)
            receives.append((buffer, dist.irecv(buffer, src=self.previous_rank, group=group, tag=virtual * len(shards) + i)))
        return receives

    def _pass(self, window: PatchWindow, run: int):
        """This stage's pass of one run of its blocks over ``window``: eager, or replayed as a CUDA
        graph captured for it.

        A graph bakes in the window (Python ints) and the addresses of the window's cache slot, so
        there is one per (slot, window, attend_stale, run), kept in the cache store, which drops a
        slot's graphs when it reallocates that slot's cache. CudaGraphForward calls the pass twice
        before capturing it: a patch pass rewrites its own window of the cache with the values the
        replay writes again (same inputs, same kernels), and reads the other patches' entries
        without changing them, so the extra calls change nothing.
        """
        run_pass = functools.partial(self._stage_pass, window, run)
        if not self.use_cuda_graphs:
            return run_pass
        from ..cuda_graphs import CudaGraphForward

        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        key = (window.branch, window.start, window.tokens, window.total, window.attend_stale, run)
        return self.kv_store.graph_for(key, lambda: CudaGraphForward(run_pass, pool=self._graph_pool))

    def _stage_pass(self, window: PatchWindow, run: int, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                    received: torch.Tensor | None = None) -> torch.Tensor:
        """One pass of one run of this stage's blocks over one patch (or the whole image): a
        function of the tensors, the window and the run only, so that it can be captured. The
        first virtual stage takes the patch's token shard [B, n, 64] and the embedded text; the
        others the buffer received from the virtual stage before (text and image hidden states,
        packed). Returns the projected output on the last virtual stage, else the packed hidden
        states for the next one."""
        stage = self.stage
        shard = -(-window.tokens // self.sequence_degree)
        if received is not None:
            text, image = received.split([received.shape[1] - shard, shard], dim=1)
        else:
            image = stage.x_embedder(image)
        layout = SequenceLayout(text.shape[1], window.tokens, shard * self.sequence_degree)
        self.window_state.window = window
        try:
            text, image = run_blocks(stage, image, text, temb, (cos, sin), {"layout": layout}, run)
        finally:
            self.window_state.window = None
        if self.plan.virtual_stage(run) == self.last_virtual_stage:
            return project_output(stage, image, temb)
        return torch.cat([text, image], dim=1).contiguous()

    def _whole_output(self, outputs, windows, shards, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The last stage's output for every patch, on every rank: broadcast, then gather the shards."""
        if self.plan.is_last:
            packed = torch.cat(outputs, dim=1).contiguous()
        else:
            packed = like.new_empty(batch, sum(shards), self.stage.out_channels)
        dist.broadcast(packed, src=self.last_rank, group=self.group)
        # Ulysses shards first, then ring chunks: a ring rank's tokens are its Ulysses group's shards.
        packed, shards = _gather_patch_shards(packed, shards, self.ulysses_group, self.ulysses_degree)
        packed, shards = _gather_patch_shards(packed, shards, self.ring_group, self.ring_degree)
        pieces = packed.split(shards, dim=1)
        return torch.cat([piece[:, : window.tokens] for piece, window in zip(pieces, windows)], dim=1)


def _gather_patch_shards(packed: torch.Tensor, shards: list[int], group, degree: int) -> tuple[torch.Tensor, list[int]]:
    """All-gather every patch's shards over ``group``: each patch's pieces joined in rank order."""
    if degree == 1:
        return packed, shards
    gathered = [torch.empty_like(packed) for _ in range(degree)]
    dist.all_gather(gathered, packed, group=group)
    per_rank = [g.split(shards, dim=1) for g in gathered]
    pieces = [torch.cat([part[i] for part in per_rank], dim=1) for i in range(len(shards))]
    return torch.cat(pieces, dim=1), [shard * degree for shard in shards]
