"""The process-group mesh built from a ParallelConfig and passed explicitly to whoever needs it.

Dimensions follow xDiT's decomposition, outermost first: data, cfg, pipefusion, ring, ulysses,
then tensor. Tensor parallelism (an all-reduce after every attention and MLP) talks most often, so
it is innermost, on neighbouring ranks; next Ulysses, whose all-to-all also wants one NVLink
island, and a ring rank's tokens are the concatenation of its Ulysses group's shards.
DistriFusion's patch dimension comes last (appended, so the others keep their places); it combines
only with data and cfg, so its groups are neighbouring ranks too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig

MESH_DIMS = ("data", "cfg", "pipefusion", "ring", "ulysses", "tensor", "distrifusion")


@dataclass
class ParallelMesh:
    config: ParallelConfig
    device_mesh: DeviceMesh | None
    control_group: dist.ProcessGroup | None
    device: torch.device
    # PipeFusion's interleaved split: the last stage hands a patch back to stage 0 between the runs.
    # Those sends get their own groups: NCCL runs a pair's sends and receives of one group in
    # order on one stream, so forward and returning hand-overs on the same pair could wait on
    # each other; in separate groups each group's traffic between two stages goes one way.
    pipefusion_return_group: dist.ProcessGroup | None = None

    @classmethod
    def build(cls, config: ParallelConfig, device: torch.device) -> "ParallelMesh":
        """Build the mesh; the default process group must already be initialised (or world size 1)."""
        if config.world_size == 1 and not dist.is_initialized():
            return cls(config, None, None, device)
        device_mesh = init_device_mesh(device.type, config.mesh_shape, mesh_dim_names=MESH_DIMS)
        # Cancel votes and other tiny host-side decisions go through gloo so they never wait
        # behind (or synchronise with) the GPU stream.
        control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        returns = None
        # "auto" resolves to interleaved for Flux-dev-like models, known only once the model is loaded.
        if config.pipefusion_parallel_degree > 1 and config.pipefusion_split in ("auto", "interleaved"):
            returns = _copies_of_groups(device_mesh, "pipefusion")
        return cls(config, device_mesh, control, device, returns)

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along one mesh dimension, or None when that dimension has size 1."""
        if self.device_mesh is None or self.device_mesh.size(MESH_DIMS.index(dim)) == 1:
            return None
        return self.device_mesh.get_group(dim)

    def size(self, dim: str) -> int:
        return self.config.mesh_shape[MESH_DIMS.index(dim)]

    def local_rank(self, dim: str) -> int:
        if self.device_mesh is None:
            return 0
        return self.device_mesh.get_local_rank(dim)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def sequence_parallel_rank(self) -> int:
        """Which shard of the image tokens this rank holds (ring-major, ulysses-minor)."""
        return self.local_rank("ring") * self.size("ulysses") + self.local_rank("ulysses")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank: one consistent decision (e.g. cancel)."""
        if self.control_group is None:
            return flag
        vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(vote.item())


def _copies_of_groups(device_mesh: DeviceMesh, dim: str) -> dist.ProcessGroup:
    """A second process group with this rank's ranks along ``dim`` (every rank creates all of them)."""
    ranks = device_mesh.mesh.movedim(MESH_DIMS.index(dim), -1).reshape(-1, device_mesh.size(MESH_DIMS.index(dim)))
    mine, _ = dist.new_subgroups_by_enumeration(ranks.tolist())
    return mine
