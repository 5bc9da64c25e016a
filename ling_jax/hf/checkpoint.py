"""Load and save Hugging Face BailingMoeV2 checkpoints (single-file or sharded safetensors).

Loading streams tensor by tensor into preallocated stacked host buffers, so host memory peaks
at about the checkpoint's size plus one tensor. Tensors are read with plain file reads, not
through safetensors' memory map: mapped file pages count toward the process's resident set until
the map is closed, which doubled the peak (the checkpoint's size again on top of the buffers).
Saving writes shard by shard through a temporary directory that is renamed into place only when
complete, so a crash never leaves a half-written checkpoint at `path`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ling_jax.config import ModelConfig
from ling_jax.hf.config import read_config, write_config
from ling_jax.hf.names import Entry, checkpoint_entries

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_IGNORED = ("model.rotary_emb.inv_freq",)  # non-persistent buffers some exporters include


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config; the message lists every offending tensor."""


class _SafetensorsReader:
    """One .safetensors file: its header (names, dtypes, shapes, offsets) and tensors read on demand
    with `readinto` straight into a fresh array (no memory map, no intermediate bytes object)."""

    def __init__(self, file: Path):
        self.file = file
        self._f = open(file, "rb")
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as e:
            self._f.close()
            raise CheckpointError(f"{file}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self._data_start = 8 + n

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str):
        code = self.header[name]["dtype"]
        if code not in _DTYPES:
            raise CheckpointError(f"{self.file}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def read(self, name: str) -> np.ndarray:
        begin, end = self.header[name]["data_offsets"]
        out = np.empty(self.shape(name), self.dtype(name))
        if out.nbytes != end - begin:
            raise CheckpointError(f"{self.file}: tensor {name} has {end - begin} bytes, its shape needs {out.nbytes}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._f.seek(self._data_start + begin)
        filled = 0
        while filled < out.nbytes:
            n = self._f.readinto(view[filled:])
            if not n:
                raise CheckpointError(f"{self.file}: truncated while reading tensor {name}")
            filled += n
        return out

    def close(self):
        self._f.close()


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    reader = _SafetensorsReader(single)
    try:
        return {name: single for name in reader.keys()}
    finally:
        reader.close()


def _check(entries: list[Entry], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    problems = []
    expected = {}
    for entry in entries:
        for name in entry.hf_names:
            expected[name] = entry.hf_shape
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif tuple(shapes[name]) != tuple(shape):
            problems.append(f"tensor {name} has shape {list(shapes[name])}, config expects {list(shape)}")
    for name in sorted(set(shapes) - set(expected)):
        if name not in _IGNORED:
            problems.append(f"unexpected tensor {name} (shape {list(shapes[name])})")
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise CheckpointError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(shown))


def _set(tree: dict, collection: str, path: tuple[str, ...], value) -> None:
    node = tree.setdefault(collection, {})
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _get(tree: dict, collection: str, path: tuple[str, ...]):
    node = tree[collection]
    for key in path:
        node = node[key]
    return node


def load_checkpoint(path, *, device_put: bool = False, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Reads a BailingMoeV2 checkpoint directory -> (ModelConfig, {"params": ..., "expert_bias": ...}).

    Tensors keep their stored dtypes. With `device_put=False` the leaves are host numpy arrays
    (memory: checkpoint size + one tensor); with True each leaf is moved to the default device as
    soon as it is complete. `config_overrides` (e.g. scan_layers=False, dtype="bfloat16") adjust
    the non-checkpoint fields of the config.
    """
    path = Path(path)
    cfg = read_config(path)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    files = _tensor_files(path)
    entries = checkpoint_entries(cfg)
    variables: dict = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for f in sorted(set(files.values())):
            handles[f] = _SafetensorsReader(f)
            stack.callback(handles[f].close)
        for name, f in files.items():
            if name not in handles[f].header:
                raise CheckpointError(f"{path}: {INDEX_FILE} maps {name} to {f.name}, which does not hold it")
        shapes = {name: handles[f].shape(name) for name, f in files.items()}
        _check(entries, shapes, path)
        for entry in entries:
            dtype = handles[files[entry.hf_names[0]]].dtype(entry.hf_names[0])
            buffers = [np.empty(entry.stack + s, dtype) for s in entry.slice_shapes]
            for flat, name in enumerate(entry.hf_names):
                where = np.unravel_index(flat, entry.stack) if entry.stack else ()
                for buffer, part in zip(buffers, entry.to_ours(handles[files[name]].read(name))):
                    buffer[where] = part
            for (collection, leaf), buffer in zip(entry.leaves, buffers):
                _set(variables, collection, leaf, jax.device_put(buffer) if device_put else buffer)
            del buffers
    return cfg, variables


def iter_hf_tensors(cfg: ModelConfig, variables: dict):
    """Yields (HF name, HF-layout numpy tensor) for every tensor of the checkpoint, in table order.

    Works on any tree with the variables' structure (e.g. gradients), one tensor at a time.
    """
    for entry in checkpoint_entries(cfg):
        leaves = [np.asarray(_get(variables, c, p)) for c, p in entry.leaves]
        for flat, name in enumerate(entry.hf_names):
            where = np.unravel_index(flat, entry.stack) if entry.stack else ()
            yield name, np.ascontiguousarray(entry.to_hf(tuple(leaf[where] for leaf in leaves)))


def save_checkpoint(cfg: ModelConfig, variables: dict, path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `variables` as a HF BailingMoeV2 checkpoint (config.json + safetensors).

    One `model.safetensors` when everything fits in `max_shard_bytes`, else numbered shards and a
    `model.safetensors.index.json`. Written to a temporary directory beside `path`, then renamed.
    """
    path = Path(path)
    entries = checkpoint_entries(cfg)
    problems = []
    for entry in entries:
        for (collection, leaf), slice_shape in zip(entry.leaves, entry.slice_shapes):
            try:
                shape = tuple(np.shape(_get(variables, collection, leaf)))
            except KeyError:
                problems.append(f"missing variable {collection}/{'/'.join(leaf)}")
                continue
            if shape != entry.stack + slice_shape:
                problems.append(
                    f"variable {collection}/{'/'.join(leaf)} has shape {list(shape)}, "
                    f"config expects {list(entry.stack + slice_shape)}"
                )
    if problems:
        raise CheckpointError("cannot save: variables do not match the config:\n  " + "\n  ".join(problems))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards, current, size, total = [], {}, 0, 0
        for name, tensor in iter_hf_tensors(cfg, variables):
            if current and size + tensor.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
            if size >= max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
        if current:
            shards.append(current)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata=metadata)
                weight_map.update({name: file for name in shard})
            with open(tmp / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        write_config(cfg, tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
