"""Load and save Hugging Face BailingMoeV2 checkpoints (single-file or sharded safetensors).

Loading: each file's header is parsed and validated by the `safetensors` library (`safe_open`:
dtypes, shapes, in-bounds, non-overlapping and gap-free data offsets, a bounded header size), then
tensors stream one by one into preallocated stacked host buffers, so host memory peaks at about the
checkpoint's size plus one tensor. The tensor bytes themselves are read with plain file reads, not
through `safe_open`'s memory map: mapped file pages count toward the process's resident set until
the map is closed, which doubles the peak (the checkpoint's size again on top of the buffers).
What the library does not check is checked here: shapes and dtypes against the config, one dtype
per stacked variable, index entries that stay inside the checkpoint directory.

Saving never deletes what it did not write: the target must be new, empty or a HF checkpoint (only
config.json and safetensors files). It writes shard by shard into a temporary directory beside the
target that is renamed into place only when complete, so a crash never leaves a half-written
checkpoint. Files and directories get the permissions normal files get (the process's umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ling_jax.config import ModelConfig
from ling_jax.hf.config import MODEL_TYPE, read_config, write_config
from ling_jax.hf.names import Entry, checkpoint_entries
from ling_jax.variables import unbox

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The dtypes a checkpoint's tensors may have (loaded as stored), by safetensors code.
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
# Bits per element of every safetensors dtype, to place tensors we do not load in the data section.
_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "C64": 64,
}  # fmt: skip
_IGNORED = ("model.rotary_emb.inv_freq",)  # non-persistent buffers some exporters include


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config, or a save would harm the target; the
    message names every offending tensor or file."""


class _SafetensorsReader:
    """One .safetensors file: its header as `safe_open` parsed and validated it (dtype codes, shapes,
    data offsets) and tensors read on demand with `readinto` straight into a fresh array (no memory
    map, no intermediate bytes object)."""

    def __init__(self, file: Path):
        self.file = file
        try:
            with safe_open(file, framework="numpy") as f:
                order = f.offset_keys()  # by data offset; the library checked they tile the data section
                slices = {name: f.get_slice(name) for name in order}
                self.info = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
        self._f = open(file, "rb")
        try:
            (header_bytes,) = struct.unpack("<Q", self._f.read(8))
            self._data_start = 8 + header_bytes
            self._offsets, begin = {}, 0
            for name in order:
                code, shape = self.info[name]
                if code not in _BITS:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {code}, which ling_jax cannot place")
                end = begin + int(np.prod(shape, dtype=np.int64)) * _BITS[code] // 8
                self._offsets[name] = (begin, end)
                begin = end
            if self._data_start + begin != os.fstat(self._f.fileno()).st_size:
                raise CheckpointError(f"{file}: tensor sizes do not add up to the file's data section")
        except BaseException:
            self._f.close()
            raise

    def keys(self):
        return self.info.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][1]

    def dtype_code(self, name: str) -> str:
        return self.info[name][0]

    def read(self, name: str) -> np.ndarray:
        code, shape = self.info[name]
        if code not in _DTYPES:
            raise CheckpointError(f"{self.file}: tensor {name} has unsupported dtype {code}")
        begin, end = self._offsets[name]
        out = np.empty(shape, _DTYPES[code])
        assert out.nbytes == end - begin, (name, out.nbytes, end - begin)
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
    """HF tensor name -> the file holding it: from the index when there is one, else the single file.

    Index entries must name files directly inside `path` (no `..`, no sub-paths, no absolute paths)
    that exist."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        if not isinstance(weight_map, Mapping):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or "\\" in file:
                raise CheckpointError(
                    f"{index}: maps {name} to {file!r}; shard files must be plain file names inside {path}"
                )
            if not (path / file).is_file():
                raise CheckpointError(f"{index}: maps {name} to {file}, which does not exist in {path}")
            files[name] = path / file
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    reader = _SafetensorsReader(single)
    try:
        return {name: single for name in reader.keys()}
    finally:
        reader.close()


def _check(entries: list[Entry], info: dict[str, tuple[str, tuple[int, ...]]], path: Path) -> None:
    """Every tensor present with its config shape, a loadable dtype, and one dtype per stacked
    variable (the stacked buffer has one dtype; a silent cast would change the stored values)."""
    problems = []
    expected = {name: entry.hf_shape for entry in entries for name in entry.hf_names}
    for name, shape in expected.items():
        if name not in info:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif tuple(info[name][1]) != tuple(shape):
            problems.append(f"tensor {name} has shape {list(info[name][1])}, config expects {list(shape)}")
        elif info[name][0] not in _DTYPES:
            problems.append(f"tensor {name} has dtype {info[name][0]}; supported: {', '.join(_DTYPES)}")
    for name in sorted(set(info) - set(expected)):
        if name not in _IGNORED:
            problems.append(f"unexpected tensor {name} (shape {list(info[name][1])})")
    for entry in entries:
        by_dtype: dict[str, list[str]] = {}
        for name in entry.hf_names:
            if name in info:
                by_dtype.setdefault(info[name][0], []).append(name)
        if len(by_dtype) > 1:
            parts = [
                f"{code} ({names[0]}" + (f" and {len(names) - 1} more)" if len(names) > 1 else ")")
                for code, names in sorted(by_dtype.items())
            ]
            problems.append(f"tensors stacked into one variable disagree in dtype: {', '.join(parts)}")
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise CheckpointError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(shown))


def _set(tree: dict, collection: str, path: tuple[str, ...], value) -> None:
    node = tree.setdefault(collection, {})
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _get(tree: Mapping, collection: str, path: tuple[str, ...]):
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
            if name not in handles[f].info:
                raise CheckpointError(f"{path}: {INDEX_FILE} maps {name} to {f.name}, which does not hold it")
        _check(entries, {name: handles[f].info[name] for name, f in files.items()}, path)
        for entry in entries:
            dtype = _DTYPES[handles[files[entry.hf_names[0]]].dtype_code(entry.hf_names[0])]
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

    Works on any tree with the variables' structure (e.g. gradients), boxed or plain, one tensor at a time.
    """
    variables = unbox(variables)
    for entry in checkpoint_entries(cfg):
        leaves = [np.asarray(_get(variables, c, p)) for c, p in entry.leaves]
        for flat, name in enumerate(entry.hf_names):
            where = np.unravel_index(flat, entry.stack) if entry.stack else ()
            yield name, np.ascontiguousarray(entry.to_hf(tuple(leaf[where] for leaf in leaves)))


# --------------------------------------------------------------------------- saving
def _is_hf_config(file: Path) -> bool:
    try:
        raw = json.loads(file.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(raw, Mapping) and raw.get("model_type") == MODEL_TYPE


def _foreign_entries(path: Path) -> list[str]:
    """Names in directory `path` that a HF checkpoint save would not have written."""
    foreign = []
    for child in sorted(path.iterdir()):
        name = child.name
        ours = child.is_file() and (name in (SINGLE_FILE, INDEX_FILE) or _SHARD.fullmatch(name) is not None)
        if name == CONFIG_FILE:
            ours = child.is_file() and _is_hf_config(child)
        if not ours:
            foreign.append(name + ("/" if child.is_dir() else ""))
    return foreign


def check_save_target(path) -> None:
    """Raises CheckpointError unless `save_checkpoint(..., path)` may write there: `path` is new, an
    empty directory, or a directory holding only a BailingMoeV2 HF checkpoint (config.json with its
    model_type, model.safetensors, the index and numbered shards), which the save then replaces.
    Anything else in the directory (a run directory, a user's file, a tokenizer) is never deleted."""
    path = Path(path).resolve()
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    foreign = _foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(
            f"will not save a checkpoint into {path}: it holds files that are not part of a HF checkpoint "
            f"({shown}), which a save would delete; choose a new or empty directory"
        )


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),)


def _check_variables(variables: Mapping, entries: list[Entry]) -> None:
    """Shapes as the config needs, dtypes the loader reads back (one per HF tensor), no leaf left out."""
    problems = []
    for entry in entries:
        dtypes = set()
        for (collection, leaf), slice_shape in zip(entry.leaves, entry.slice_shapes):
            where = f"{collection}/{'/'.join(leaf)}"
            try:
                value = _get(variables, collection, leaf)
            except (KeyError, TypeError):
                problems.append(f"missing variable {where}")
                continue
            shape = tuple(np.shape(value))
            if shape != entry.stack + slice_shape:
                problems.append(
                    f"variable {where} has shape {list(shape)}, config expects {list(entry.stack + slice_shape)}"
                )
            dtype = np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype)
            if dtype not in {np.dtype(t) for t in _DTYPES.values()}:
                problems.append(
                    f"variable {where} has dtype {dtype}; a checkpoint holds float32, bfloat16, float16 or float64"
                )
            dtypes.add(dtype)
        if len(dtypes) > 1:
            names = ", ".join(f"{c}/{'/'.join(p)}" for c, p in entry.leaves)
            problems.append(f"variables {names} form one HF tensor but have dtypes {sorted(map(str, dtypes))}")
    expected = {(c, *p) for entry in entries for c, p in entry.leaves}
    for leaf in sorted(set(_leaf_paths(variables)) - expected):
        problems.append(f"unexpected variable {'/'.join(leaf)} (no HF tensor of this config holds it)")
    if problems:
        raise CheckpointError("cannot save: variables do not match the config:\n  " + "\n  ".join(problems))


def save_checkpoint(cfg: ModelConfig, variables: dict, path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `variables` (plain or as `init` returns them, boxed) as a HF BailingMoeV2 checkpoint
    (config.json + safetensors) at `path`.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else numbered shards and a
    `model.safetensors.index.json`. `path` must be new, empty or a HF checkpoint (`check_save_target`);
    the new checkpoint is written to a temporary directory beside it, then renamed into place.
    """
    entries = checkpoint_entries(cfg)
    variables = unbox(variables)  # `init` output (logically partitioned boxes) or plain arrays
    _check_variables(variables, entries)
    path = Path(path).resolve()  # a symlink's target is replaced, the link kept
    check_save_target(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any new directory
            break
        except FileExistsError:
            continue
    try:
        if path.is_dir():  # replacing a checkpoint: keep its directory's permissions
            os.chmod(tmp, path.stat().st_mode & 0o7777)
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
        file_mode = 0o666 & ~_umask()
        for file in tmp.iterdir():  # safetensors creates its files 0600 whatever the umask
            os.chmod(file, file_mode)
        if path.exists():
            old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)  # only our own files: check_save_target allowed nothing else
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
