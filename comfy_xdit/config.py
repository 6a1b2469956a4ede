"""The parallel configuration: frozen, validated when it is built, shared by every rank.

Every check here runs before any process or GPU is touched, so a wrong setting is refused with a
message that names the setting to change instead of surfacing later as a hung collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "flash_attn", "cpu_flash")
# How PipeFusion splits the blocks over its stages (pipefusion/partition.py says what each costs).
PIPEFUSION_SPLITS = ("auto", "parameters", "compute", "interleaved")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class ParallelConfig:
    """How one generation is spread over workers.

    The workers form a mesh of shape (data, cfg, pipefusion, ring, ulysses, tensor, distrifusion); the
    product of the degrees is the number of workers, one per entry of ``devices``.

    ``warmup_steps``: the synchronous (exact) sampler steps before PipeFusion and DistriFusion
    switch to one-step-stale keys/values of the other patches.

    ``pipefusion_split``: how PipeFusion splits the transformer blocks over its stages: "parameters"
    (even weight memory per GPU), "compute" (even block count, so even time per stage),
    "interleaved" (both: each stage holds two runs, 1/N of the double and 1/N of the single blocks)
    or "auto" (default): interleaved where every stage can hold a double and a single block, else
    parameters (pipefusion/partition.py).

    ``ulysses_head_chunks`` (Flux, ring_degree 1): split each Ulysses rank's heads into this many
    chunks and pipeline the all-to-alls with attention (attention/ulysses_chunks.py); None (default)
    picks 2 for Flux where Ulysses runs without Ring and 2 divides a rank's heads, else 1.

    ``ulysses_overlap_mlp`` (Flux, ring_degree 1): run each single block's Ulysses all-to-all
    beside its MLP projection instead of after it (models/flux_overlap.py); None (default) turns it
    on for Flux wherever it can run. Both are exact; False / 1 turn them off.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_parallel_degree: int = 1
    num_pipeline_patches: int | None = None
    use_cfg_parallel: bool = False
    data_parallel_degree: int = 1
    tensor_parallel_degree: int = 1
    warmup_steps: int = 1
    attention_backend: str = "auto"
    devices: tuple[str, ...] = field(default=("cpu",))
    # DistriFusion: every worker of a group holds the whole model and denoises its patch of the image
    distrifusion_degree: int = 1
    pipefusion_split: str = "auto"
    ulysses_head_chunks: int | None = None
    ulysses_overlap_mlp: bool | None = None

    @property
    def overlaps_mlp(self) -> bool:
        """ulysses_overlap_mlp resolved (Flux): None is on wherever Ulysses runs without Ring,
        PipeFusion or DistriFusion (those paths run the blocks with their own attention)."""
        if self.ulysses_overlap_mlp is not None:
            return self.ulysses_overlap_mlp
        return (self.ulysses_degree > 1 and self.ring_degree == 1 and self.pipefusion_parallel_degree == 1
                and self.distrifusion_degree == 1)

    def __post_init__(self) -> None:
        # Accept lists from JSON or the command line but keep the config hashable.
        object.__setattr__(self, "devices", tuple(str(d) for d in self.devices))
        for name in ("ulysses_degree", "ring_degree", "pipefusion_parallel_degree", "data_parallel_degree",
                     "tensor_parallel_degree", "distrifusion_degree", "ulysses_head_chunks"):
            value = getattr(self, name)
            if name == "ulysses_head_chunks" and value is None:
                continue  # chosen once the model is known
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a whole number of at least 0, got {self.warmup_steps!r}")
        if self.num_pipeline_patches is not None and self.num_pipeline_patches < 1:
            raise ConfigError(f"num_pipeline_patches must be at least 1, got {self.num_pipeline_patches!r}")
        if self.pipefusion_split not in PIPEFUSION_SPLITS:
            raise ConfigError(f"pipefusion_split {self.pipefusion_split!r} is unknown; choose one of "
                              f"{', '.join(PIPEFUSION_SPLITS)}")
        if (self.ulysses_head_chunks or 1) > 1 and (self.ulysses_degree == 1 or self.ring_degree > 1):
            raise ConfigError(
                f"ulysses_head_chunks={self.ulysses_head_chunks} pipelines the Ulysses all-to-all: it needs "
                f"ulysses_degree > 1 and ring_degree=1 (got {self.ulysses_degree} and {self.ring_degree}); "
                "set ulysses_head_chunks to 1"
            )
        if self.ulysses_overlap_mlp is not None and not isinstance(self.ulysses_overlap_mlp, bool):
            raise ConfigError(f"ulysses_overlap_mlp must be true, false or null (auto), got {self.ulysses_overlap_mlp!r}")
        if self.ulysses_overlap_mlp:
            others = [f"{name}={value}" for name, value in (
                ("pipefusion_parallel_degree", self.pipefusion_parallel_degree),
                ("distrifusion_degree", self.distrifusion_degree)) if value > 1]
            if self.ulysses_degree == 1 or self.ring_degree > 1 or others:
                # Those paths run the blocks with their own attention; a silently ignored switch would
                # leave a benchmark row labelled with an overlap it did not have.
                raise ConfigError(
                    "ulysses_overlap_mlp overlaps the Ulysses all-to-all with the MLP: it needs ulysses_degree > 1 "
                    f"and ring_degree=1 (got {self.ulysses_degree} and {self.ring_degree})"
                    + (f" and no {', '.join(others)}" if others else "") + "; turn ulysses_overlap_mlp off"
                )
        if self.tensor_parallel_degree > 1:
            others = [f"{name}={value}" for name, value in (
                ("ulysses_degree", self.ulysses_degree), ("ring_degree", self.ring_degree),
                ("pipefusion_parallel_degree", self.pipefusion_parallel_degree)) if value > 1]
            if others:
                # Sequence parallelism and PipeFusion split the tokens or layers that tensor parallelism keeps
                # whole on every rank; their attention paths are not written for a rank's subset of the heads.
                raise ConfigError(
                    f"tensor_parallel_degree={self.tensor_parallel_degree} with {' and '.join(others)} is not supported; "
                    "tensor parallelism combines with use_cfg_parallel and data_parallel_degree only: set "
                    f"{' and '.join(o.split('=')[0] for o in others)} to 1, or tensor_parallel_degree to 1"
                )
        if self.distrifusion_degree > 1:
            others = [f"{name}={value}" for name, value in (
                ("ulysses_degree", self.ulysses_degree), ("ring_degree", self.ring_degree),
                ("pipefusion_parallel_degree", self.pipefusion_parallel_degree),
                ("tensor_parallel_degree", self.tensor_parallel_degree)) if value > 1]
            if others:
                # DistriFusion's patches are its own split of the image tokens; its stale K/V exchange is
                # not written for a rank that holds a further shard (sequence parallel), a stage
                # (PipeFusion) or a slice of the heads (tensor parallel).
                raise ConfigError(
                    f"distrifusion_degree={self.distrifusion_degree} with {' and '.join(others)} is not supported; "
                    "DistriFusion combines with use_cfg_parallel and data_parallel_degree only: set "
                    f"{' and '.join(o.split('=')[0] for o in others)} to 1, or distrifusion_degree to 1"
                )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend {self.attention_backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if not self.devices:
            raise ConfigError("devices is empty; give one device per worker, for example ('cuda:0', 'cuda:1')")
        kinds = {split_node(d)[1].split(":")[0] for d in self.devices}
        if len(kinds) > 1:
            raise ConfigError(f"devices mix kinds {sorted(kinds)}; use only GPUs or only CPU workers")
        if kinds == {"cuda"} and len(set(self.devices)) != len(self.devices):
            raise ConfigError(f"devices {list(self.devices)} name a GPU twice; give each worker its own GPU")
        if self.world_size != len(self.devices):
            raise ConfigError(
                f"the degrees multiply to {self.world_size} workers ({self.describe_degrees()}) but "
                f"{len(self.devices)} device(s) were given ({', '.join(self.devices)}); change the degrees so their "
                f"product is {len(self.devices)}, or give {self.world_size} devices"
            )

    @property
    def cfg_degree(self) -> int:
        return 2 if self.use_cfg_parallel else 1

    @property
    def sequence_parallel_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def mesh_shape(self) -> tuple[int, int, int, int, int, int, int]:
        return (
            self.data_parallel_degree,
            self.cfg_degree,
            self.pipefusion_parallel_degree,
            self.ring_degree,
            self.ulysses_degree,
            self.tensor_parallel_degree,
            self.distrifusion_degree,
        )

    @property
    def pipeline_patches(self) -> int:
        """PipeFusion's patch count M: num_pipeline_patches, or the pipefusion degree when unset."""
        return self.num_pipeline_patches or self.pipefusion_parallel_degree

    @property
    def device_type(self) -> str:
        return split_node(self.devices[0])[1].split(":")[0]

    @property
    def nnodes(self) -> int:
        """How many hosts the workers span (devices of node K > 0 are written 'K/cuda:0')."""
        return 1 + max(split_node(d)[0] for d in self.devices)

    def node_devices(self, node: int = 0) -> tuple[str, ...]:
        """The devices of one host, without their node prefix (node 0: the pool's own host)."""
        return tuple(local for n, local in map(split_node, self.devices) if n == node)

    def describe_degrees(self) -> str:
        return (
            f"data={self.data_parallel_degree} x cfg={self.cfg_degree} x "
            f"pipefusion={self.pipefusion_parallel_degree} x ring={self.ring_degree} x ulysses={self.ulysses_degree}"
            + (f" x tensor={self.tensor_parallel_degree}" if self.tensor_parallel_degree > 1 else "")
            + (f" x distrifusion={self.distrifusion_degree}" if self.distrifusion_degree > 1 else "")
        )

    def check_model(self, *, num_heads: int, family: str, num_blocks: int | None = None) -> None:
        """Refuse settings the loaded model cannot take (called once the model's shape is known).

        ``num_blocks``: the transformer blocks PipeFusion can split over its stages.
        """
        if num_heads % self.ulysses_degree:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ConfigError(
                f"ulysses_degree={self.ulysses_degree} does not divide the {num_heads} attention heads of this "
                f"{family} model; use one of {divisors} (or move the rest of the degree to ring_degree)"
            )
        if self.ulysses_overlap_mlp and not family.startswith("Flux"):
            raise ConfigError(f"ulysses_overlap_mlp is implemented for Flux only, not {family}; turn it off")
        if (self.ulysses_head_chunks or 1) > 1:
            if not family.startswith("Flux"):
                raise ConfigError(f"ulysses_head_chunks is implemented for Flux only, not {family}; set it to 1")
            per_rank = num_heads // self.ulysses_degree
            if per_rank % self.ulysses_head_chunks:
                divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
                raise ConfigError(
                    f"ulysses_head_chunks={self.ulysses_head_chunks} does not divide the {per_rank} heads each of the "
                    f"{self.ulysses_degree} Ulysses ranks holds in this {family} model; use one of {divisors}"
                )
        if num_heads % self.tensor_parallel_degree:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ConfigError(
                f"tensor_parallel_degree={self.tensor_parallel_degree} does not divide the {num_heads} attention heads "
                f"of this {family} model; use one of {divisors}"
            )
        if num_blocks is not None and self.pipefusion_parallel_degree > num_blocks:
            raise ConfigError(
                f"pipefusion_parallel_degree={self.pipefusion_parallel_degree} splits the layers over more stages than "
                f"this {family} model's {num_blocks} transformer blocks; use at most {num_blocks}"
            )

    def check_request(self, *, batch_size: int, uses_cfg: bool) -> None:
        """Refuse a generation request this mesh cannot split."""
        if batch_size < self.data_parallel_degree:
            raise ConfigError(
                f"data_parallel_degree={self.data_parallel_degree} needs a batch of at least {self.data_parallel_degree} "
                f"images, got {batch_size}; raise the batch size or lower data_parallel_degree"
            )
        if self.use_cfg_parallel and not uses_cfg:
            raise ConfigError(
                "use_cfg_parallel needs classifier-free guidance (cfg > 1 with a negative prompt); "
                "turn use_cfg_parallel off or raise cfg above 1"
            )


def split_node(device: str) -> tuple[int, str]:
    """'cuda:1' -> (0, 'cuda:1'); '2/cuda:1', a GPU of node 2 in a multi-node pool -> (2, 'cuda:1')."""
    node, sep, local = device.rpartition("/")
    if not sep:
        return 0, device
    if not node.isdigit():
        raise ConfigError(f"device {device!r}: a node prefix is a node number, as in '1/cuda:0'")
    return int(node), local


def check_local_devices_exist(devices: tuple[str, ...]) -> None:
    """Refuse GPUs this machine does not have (node 0's devices; other nodes check their own)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in devices:
        node, local = split_node(device)
        kind, _, index = local.partition(":")
        if node != 0 or kind != "cuda":
            continue
        if not index.isdigit() or int(index) >= visible:
            have = ", ".join(f"cuda:{i}" for i in range(visible)) or "no GPU"
            raise ConfigError(f"device {device!r} does not exist on this machine ({have} visible); "
                              "name existing devices or set devices to auto")


def default_devices(count: int | None = None) -> tuple[str, ...]:
    """All visible GPUs, or two CPU workers when there is no GPU."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count() if count is None else count
        return tuple(f"cuda:{i}" for i in range(n))
    return ("cpu",) * (2 if count is None else count)
