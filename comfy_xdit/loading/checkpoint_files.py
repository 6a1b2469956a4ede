"""What every family's checkpoint class shares: opening the files, header checks, float reads.

Each family (loading/flux.py, sd3.py, pixart.py, wan.py, qwen_image.py, hunyuan_video.py, ...) knows
its own layouts, config inference and key conversion; opening, refusing quantized tensors, naming
missing or unexpected keys, reading scaled-fp8 weights as floats and closing are the same for all
of them and live here, as does reading a checkpoint in diffusers' names or converting one in its
original repository's (ConvertedCheckpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .safetensors_files import CheckpointError, SafetensorsSource, find_layouts, find_weight_files

# Companions of weights in ComfyUI's scaled-fp8 files: consumed while reading, never loaded.
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
SCALED_FP8_MARKER = "scaled_fp8"
# The layout name of a checkpoint already in diffusers' tensor names (no conversion).
DIFFUSERS_LAYOUT = "diffusers"

FLOAT8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
FLOAT_DTYPE_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LOAD_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def as_load_dtype(dtype) -> torch.dtype:
    """A dtype name or torch dtype the loaders accept (bf16, fp16, fp32), else a clear error."""
    if isinstance(dtype, str):
        if dtype.lower() not in _LOAD_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use bf16, fp16 or fp32")
        return _LOAD_DTYPES[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def to_float(source: SafetensorsSource, key: str, tensor: torch.Tensor, part: bool = False) -> torch.Tensor:
    """A tensor (or a ``part`` of it) read from ``key`` in float form, with a scaled-fp8 scale applied."""
    scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
    if scale_key and scale_key in source:
        scale = source.get(scale_key).float()
        if part and scale.numel() != 1:  # a per-channel scale would have to be sliced with the part
            raise CheckpointError(f"{scale_key!r} holds {scale.numel()} scales; only one scale per weight is supported")
        return tensor.float() * scale
    if tensor.dtype in FLOAT8_DTYPES:
        return tensor.float()
    return tensor


def detect_layout(keys: Iterable[str], signatures: dict[str, tuple[str, ...]], what: str,
                  layout_names: dict[str, str], shown: int = 3) -> tuple[str, str]:
    """The one (layout, prefix) whose signature keys the file holds, else an error naming what was expected.

    ``layout_names`` maps each layout of ``signatures`` to the words the message uses for it
    (for example "Wan / ComfyUI"); ``shown`` signature keys of each are named.
    """
    found = find_layouts(keys, signatures)
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"several {what} transformers in one file (layout, prefix): {sorted(found)}")
    expected = " or ".join(f"{' + '.join(signatures[layout][:shown])} ({name} layout)" for layout, name in layout_names.items())
    raise CheckpointError(f"not a {what} transformer checkpoint: expected {expected}")


def map_block_tensor(key: str, tensor: torch.Tensor, target: str, inner: str, suffix: str, renames: dict[str, str],
                     splits: dict[str, tuple[str, ...]], out: dict[str, torch.Tensor]) -> bool:
    """Put one block tensor of an original-layout file under its diffusers name(s) in ``out``:
    ``inner`` renamed by ``renames``, or cut along dim 0 into the equal projections ``splits`` names
    (a fused qkv or kv). ``target`` is the diffusers block prefix. False: neither table knows it."""
    if inner in renames:
        out[f"{target}{renames[inner]}.{suffix}"] = tensor
        return True
    if inner in splits:
        parts = splits[inner]
        if tensor.shape[0] % len(parts):
            raise CheckpointError(f"tensor {key!r} of shape {tuple(tensor.shape)} does not split into {len(parts)} projections")
        for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0)):
            out[f"{target}{part}.{suffix}"] = chunk
        return True
    return False


def refuse_quantized(source: SafetensorsSource, keys: Iterable[str], use: str = "use a bf16, fp16 or fp8 file") -> None:
    """Refuse integer or packed tensors (bitsandbytes, int8, GGUF-style) from their header dtype."""
    for key in keys:
        code = source.dtype_name(key)
        if code not in FLOAT_DTYPE_CODES:
            raise CheckpointError(
                f"tensor {key!r} is stored as {code}: quantized (bitsandbytes, int8, GGUF-style) checkpoints are not "
                f"supported; {use}"
            )


def refuse_key_mismatch(wanted: Iterable[str], present: Iterable[str], what: str,
                        also_unexpected: Iterable[str] = (), unexpected_note: str = "",
                        error: type[CheckpointError] = CheckpointError) -> None:
    """Name the first missing and unexpected keys when ``present`` is not exactly ``wanted``."""
    wanted, present = set(wanted), set(present)
    missing = sorted(wanted - present)
    unexpected = sorted(present - wanted) + list(also_unexpected)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])}{unexpected_note})")
    raise error(f"does not match {what}: " + "; ".join(parts))


def refuse_shape_mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                          naming: str = " (diffusers name)") -> None:
    for key, shape in found.items():
        if tuple(shape) != tuple(expected[key]):
            raise CheckpointError(f"tensor {key!r}{naming} has shape {tuple(shape)}, expected {tuple(expected[key])}")


class ClosesSource:
    """``close`` and the context-manager protocol over ``self.source`` (a SafetensorsSource)."""

    source: SafetensorsSource

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TransformerCheckpoint(ClosesSource):
    """An opened transformer checkpoint: a single file or a diffusers folder, headers only.

    A subclass's ``_open(config_path)`` sets ``prefix``, ``config`` and whatever its conversion
    needs, validating every header-level fact (keys, shapes, dtypes), so a bad file is refused
    before any weight is read or any GPU is touched; a refusal closes the files and names the path.
    """

    prefix = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files, config_path = find_weight_files(self.path)
        self.source = SafetensorsSource(files)
        try:
            self._open(config_path)
        except CheckpointError as error:
            self.source.close()
            raise CheckpointError(f"{self.path}: {error}") from None

    def _open(self, config_path: Path | None) -> None:
        raise NotImplementedError

    def unprefixed_keys(self) -> list[str]:
        """Every key under the detected prefix, without it."""
        return [k[len(self.prefix):] for k in self.source.keys() if k.startswith(self.prefix)]

    def weight_names(self) -> list[str]:
        """The weights under the prefix, without scaled-fp8 companions (consumed while reading)."""
        return sorted(k for k in self.unprefixed_keys() if not k.endswith(SCALE_SUFFIXES) and k != SCALED_FP8_MARKER)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.prefix + name)

    def refuse_unless_it_converts(self, convert, meta_model: torch.nn.Module, what: str, unexpected_note: str = "") -> None:
        """Run ``convert`` (source weights -> (diffusers weights, unused source keys)) on meta tensors of
        the header shapes, without reading a weight, and refuse any key or shape ``meta_model`` lacks."""
        converted, unused = convert({k: torch.empty(self.shape(k), device="meta") for k in self.weight_keys})
        expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
        refuse_key_mismatch(expected, converted, what, also_unexpected=unused, unexpected_note=unexpected_note)
        refuse_shape_mismatch({k: t.shape for k, t in converted.items()}, expected)

    def _read(self, name: str) -> torch.Tensor:
        """One source tensor in float form, with a scaled-fp8 scale applied."""
        return to_float(self.source, self.prefix + name, self.source.get(self.prefix + name))

    def read_part(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows (and columns) of one source tensor in float form; only those bytes are read."""
        return to_float(self.source, self.prefix + name, self.source.get_part(self.prefix + name, rows, cols), part=True)


class ConvertedCheckpoint(TransformerCheckpoint):
    """A checkpoint in diffusers' names or in its original repository's, converted on read.

    A subclass's ``_open`` sets ``layout``, ``prefix``, ``weight_keys`` and ``config`` and then calls
    ``_validate``; the subclass names the model, converts the original layout and builds an empty
    (meta) model of the config to check the converted keys and shapes against.
    """

    describes = "a transformer"  # "a PixArt transformer": the start of a refusal's "not ..." phrase
    names_note = ""  # appended inside the parentheses of that phrase
    quantized_use = "use a bf16, fp16 or fp8 file"
    unexpected_note = ""

    def convert_original(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Original-layout tensors -> (diffusers tensors, source keys left unused)."""
        raise NotImplementedError

    def meta_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def load_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype diffusers tensor ``name`` is loaded in (a family may keep some in float32)."""
        return dtype

    def _validate(self) -> None:
        refuse_quantized(self.source, [self.prefix + k for k in self.weight_keys], use=self.quantized_use)
        # The whole mapping on meta tensors: key names and shapes, without reading any weight.
        self.refuse_unless_it_converts(self._to_diffusers, self.meta_model(),
                                       f"{self.describes} ({self.layout} layout, prefix {self.prefix!r}{self.names_note})",
                                       unexpected_note=self.unexpected_note)

    def _to_diffusers(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        if self.layout == DIFFUSERS_LAYOUT:
            return dict(state_dict), []
        return self.convert_original(state_dict)

    def state_dict(self, dtype=torch.bfloat16, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        dtype = as_load_dtype(dtype)
        converted, _ = self._to_diffusers({key: self._read(key) for key in self.weight_keys})
        # contiguous: the converters' chunks are views; each parameter gets its own storage.
        return {k: v.to(device, self.load_dtype(k, dtype)).contiguous() for k, v in converted.items()}
