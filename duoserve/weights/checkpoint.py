"""Tensor sources: an HF safetensors checkpoint folder, or synthetic random weights.

Both answer `get(name, shape)` for one on-disk tensor name, read lazily and one at a time
(expert tensors are separate byte ranges in safetensors, so one expert never needs the
whole file in memory), and both track which names were used so that a load can end with
"nothing missing, nothing left over". Only safetensors are read; pickle files are refused.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint we refuse to load; the message names the file and tensor."""


class SafetensorsCheckpoint:
    """All tensors of a folder of `*.safetensors` files (with or without an index)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()
        self._index_files()

    def _index_files(self) -> None:
        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: malformed index ({exc!r})") from exc
            for name, file_name in weight_map.items():
                path = self.model_dir / file_name
                if not path.is_file():
                    raise CheckpointError(f"{index_path}: tensor '{name}' points to missing {path}")
                self.file_of[name] = path
            return
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = (
                f" (found {', '.join(sorted(pickles))}: pickle checkpoints are never loaded; "
                "convert them to safetensors)"
                if pickles
                else ""
            )
            raise CheckpointError(f"{self.model_dir}: no *.safetensors files{hint}")
        for path in files:
            for name in self._open(path).keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.file_of[name] = path

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        return self._handles[path]

    def keys(self) -> Iterable[str]:
        return self.file_of.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._file(name))
        return tuple(handle.get_slice(name).get_shape())

    def _file(self, name: str) -> Path:
        if name not in self.file_of:
            raise CheckpointError(f"{self.model_dir}: missing tensor '{name}'")
        return self.file_of[name]

    def get(
        self, name: str, shape: tuple[int, ...], device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Read one tensor, checking its shape and that it is floating point."""
        path = self._file(name)
        tensor = self._open(path).get_tensor(name)
        check_tensor(tensor, name, shape, path)
        self.used.add(name)
        return tensor.to(device)

    def unused(self) -> list[str]:
        return sorted(set(self.file_of) - self.used)


def check_tensor(tensor: torch.Tensor, name: str, shape: tuple[int, ...], where: object) -> None:
    """Raise CheckpointError unless `tensor` has `shape` and a float dtype."""
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{where}: tensor '{name}' has dtype {tensor.dtype}, expected one of "
            "float32, bfloat16, float16"
        )


class SyntheticCheckpoint:
    """Random weights of realistic scale, generated per tensor name, deterministically.

    Linear weights and embeddings ~ N(0, init_std) (the families' initializer_range), norm
    weights 1, biases 0. Each tensor is a pure function of (seed, name), so two processes, or
    our model and a transformers model, can build identical weights without sharing memory.
    Generation runs on `device` (fast on a GPU; then copied where the caller wants it).
    """

    def __init__(self, seed: int = 0, init_std: float = 0.02, device: str = "cpu") -> None:
        self.seed = seed
        self.init_std = init_std
        self.device = torch.device(device)
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return True

    def get(
        self, name: str, shape: tuple[int, ...], device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        self.used.add(name)
        return synthetic_tensor(name, shape, self.seed, self.init_std, self.device).to(device)

    def unused(self) -> list[str]:
        return []


def synthetic_tensor(
    name: str, shape: tuple[int, ...], seed: int, init_std: float, device: torch.device
) -> torch.Tensor:
    """The float32 value of tensor `name` in the synthetic model with `seed`."""
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    if "norm" in leaf[-2] and name.endswith(".weight"):
        return torch.ones(shape, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed((zlib.crc32(name.encode()) * 1_000_003 + seed) % (2**63))
    out = torch.empty(shape, device=device)
    return out.normal_(0.0, init_std, generator=gen)
