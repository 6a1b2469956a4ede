"""Finding and opening safetensors checkpoints, one tensor at a time.

Only safetensors are read: a pickle checkpoint (.ckpt, .pt, .bin) can run code when it is
loaded, so it is refused before it is opened. Files are opened with ``safe_open``, which reads
only the header; tensors are then read by key, so a caller that needs a few blocks (PipeFusion
stages) never reads the rest of a 24 GB file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# The file names diffusers writes into a model folder.
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the path and what is wrong."""


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: only .safetensors files are read; pickle-based checkpoints are refused "
        "(they can run code when loaded). Convert it to .safetensors or use the safetensors release."
    )


def find_weight_files(path: str | Path, subfolder: str = "transformer") -> tuple[list[Path], Path | None]:
    """Return the safetensors files of a checkpoint and the config.json beside them, if any.

    ``path`` is a single file or a diffusers folder. A pipeline folder (``model_index.json``
    and one subfolder per component) is entered at ``subfolder``. A sharded folder is read
    through its index, so stray files next to the shards are ignored.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if suffix not in SAFETENSORS_SUFFIXES:
            raise CheckpointError(
                f"{path}: expected a .safetensors file or a diffusers folder, got a {suffix or 'suffix-less'} file"
            )
        return [path], None

    folder = path
    if (folder / subfolder).is_dir() and not (folder / "config.json").is_file():
        folder = folder / subfolder
    config = folder / "config.json"
    config = config if config.is_file() else None

    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = folder / DIFFUSERS_INDEX_NAME if (folder / DIFFUSERS_INDEX_NAME).is_file() else indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: unreadable shard index ({error})") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {index.name} is missing")
        return files, config

    if (folder / DIFFUSERS_WEIGHTS_NAME).is_file():
        return [folder / DIFFUSERS_WEIGHTS_NAME], config
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SAFETENSORS_SUFFIXES)
    if files:
        return files, config
    pickles = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"{folder}: no .safetensors files in this folder")


class SafetensorsSource:
    """Tensors of one or more safetensors files, looked up by key and read on demand.

    Opening reads only the headers, so shapes and dtypes are known before any weight is read.
    """

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in self.files:
            handle = self._open(file)
            self._handles[file] = handle
            for key in handle.keys():
                if key in self._file_of:
                    raise CheckpointError(
                        f"tensor {key!r} is in both {self._file_of[key]} and {file}; "
                        "point at one file or at a folder with a shard index"
                    )
                self._file_of[key] = file

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint not found: {file}") from error
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{file}: cannot read it: the file is truncated or not a safetensors file ({error})"
            ) from error

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str):
        if key not in self._file_of:
            raise KeyError(key)
        return self._handles[self._file_of[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape from the header, without reading its data."""
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype code from the header ("BF16", "F8_E4M3", "U8", ...)."""
        return self._handle(key).get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except (SafetensorError, OSError) as error:
            file = self._file_of[key]
            raise CheckpointError(
                f"{file}: cannot read tensor {key!r}: the file is truncated or not a safetensors file ({error})"
            ) from error

    def get_part(self, key: str, rows: tuple[int, int], cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [start, stop) (and columns, if given) of one tensor; only those bytes are read.

        Tensor parallelism reads each rank's slice this way: the whole tensor is never in memory.
        """
        try:
            part = self._handle(key).get_slice(key)
            return part[rows[0]:rows[1]] if cols is None else part[rows[0]:rows[1], cols[0]:cols[1]]
        except (SafetensorError, OSError) as error:
            file = self._file_of[key]
            raise CheckpointError(
                f"{file}: cannot read tensor {key!r}: the file is truncated or not a safetensors file ({error})"
            ) from error

    def close(self) -> None:
        # Dropping the handles unmaps the files (safe_open keeps an mmap per file).
        self._handles.clear()
        self._file_of.clear()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_layouts(keys, signatures: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Every (layout, prefix) under which ``keys`` hold all of one layout's signature keys.

    The prefix is what precedes the first signature key (``""`` or e.g. ``model.diffusion_model.``);
    a layout matches only if every other signature key sits under the same prefix.
    """
    keys = set(keys)
    found = []
    for layout, signature in signatures.items():
        anchor = signature[0]
        for key in keys:
            if not key.endswith(anchor):
                continue
            prefix = key[: -len(anchor)]
            if prefix and not prefix.endswith("."):
                continue
            if all(prefix + name in keys for name in signature):
                found.append((layout, prefix))
    return found


def assign_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Put complete weights into a model built on the meta device (no initialisation, no copy).

    ``what`` names the model in the error (e.g. the class and its config) when the weights do
    not fit; a tensor left on the meta device afterwards is a loader bug, reported as such.
    """
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights do not fit {what}: {error}") from error
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"internal: tensors not loaded from the checkpoint: {left_on_meta[:5]}")
    return model.eval()
