"""Where the model's Pallas kernels (the FP8 matmul, the router) run, and how they see a device mesh.

Target. `kernel_platform()` is the platform of the mesh the step is traced under (`jax.set_mesh`, as
`make_train_step` and `make_eval_step` do), else the default backend. So a train step traced on a
CPU host for a TPU topology mesh lowers the Mosaic kernels instead of interpreting them.

Partitioning. A Mosaic kernel cannot be partitioned by GSPMD ("wrap the call in a shard_map"), so
under a multi-device mesh `per_row_shard` runs a row-wise op per device in a `jax.shard_map`: the
rows (tokens) split over the mesh axes the rules table gives "activation_batch" (data, fsdp, expert),
the other operands replicated on every
device (a weight is gathered, as FSDP gathers it for any matmul; its gradient is summed over the
devices by the shard_map's transpose). Devices of the "model" axis hold the same rows and compute
the same result (no tensor parallelism inside a kernel call). Rows that do not split evenly run
replicated. Without a mesh, with a one-device mesh, or inside a shard_map already, the op is called
as is. The result equals one device's when every shard holds a multiple of 128 rows; otherwise the
FP8 weight gradient's [128, 1] tiles along the rows are per shard (as in any data-parallel FP8
training), which changes it by FP8 rounding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from ling_jax.sharding.rules import mesh_axes

# NVIDIA Hopper (compute capability 9.x) device kinds: "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 ...".
_HOPPER_KIND = re.compile(r"\bG?H(100|200|800|20)\b")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a traced program is compiled for: platform ("cpu", "gpu", "tpu") and device kind
    (e.g. "TPU v5p", "NVIDIA H100 80GB HBM3"; "" where unknown)."""

    platform: str
    device_kind: str = ""

    def __post_init__(self):
        platform = _PLATFORM_ALIASES.get(self.platform.lower(), self.platform.lower())
        if platform not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"unknown platform {self.platform!r}; expected 'cpu', 'gpu' or 'tpu'")
        object.__setattr__(self, "platform", platform)

    @property
    def is_hopper(self) -> bool:
        """An NVIDIA Hopper GPU (compute capability 9.x), judged from the device kind."""
        return self.platform == "gpu" and _HOPPER_KIND.search(self.device_kind) is not None

    @classmethod
    def of_device(cls, device) -> Target:
        """The target of a device (a jax.Device, a topology's device or a mesh's AbstractDevice)."""
        return cls(device.platform, getattr(device, "device_kind", "") or "")


def kernel_target() -> Target:
    """The target of the traced program: the context mesh's devices (a TPU topology mesh on a CPU
    host: TPU), else the default device."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return Target.of_device(device if device is not None else jax.devices()[0])


def kernel_platform() -> str:
    """Platform the traced program targets: the context mesh's devices, else the default backend."""
    return kernel_target().platform


def row_axes(mesh, num_rows: int) -> tuple[str, ...]:
    """The mesh axes `per_row_shard` splits `num_rows` rows over: those the rules table gives
    "activation_batch" that have size > 1, or none when the rows do not split evenly over them."""
    axes = tuple(a for a in mesh_axes("activation_batch", mesh.axis_names) if mesh.shape[a] > 1)
    return () if num_rows % math.prod(mesh.shape[a] for a in axes) else axes


def pallas_interpret() -> bool | None:
    """`interpret` for the kernel configs: True for a CPU target, False for TPU, None otherwise (the
    ops decide; e.g. the FP8 matmul's Triton kernel on GPU)."""
    return {"cpu": True, "tpu": False}.get(kernel_platform())


def length_axes(mesh, length: int) -> tuple[str, ...]:
    """The mesh axes `per_row_shard(..., sequence=True)` splits a sequence of `length` over: those the
    rules table gives "activation_length" (context) that have size > 1, or none when it does not
    split evenly over them."""
    axes = tuple(a for a in mesh_axes("activation_length", mesh.axis_names) if mesh.shape[a] > 1)
    return () if length % math.prod(mesh.shape[a] for a in axes) else axes


def per_row_shard(fn: Callable, rows: tuple, replicated: tuple = (), *, sequence: bool = False):
    """fn(*rows, *replicated), each device computing the rows of its batch shard (see the module
    docstring). Every array in `rows` and every output has the rows on its leading axis; with
    `sequence` they are [B, T, ...] and T is split over the rules' "activation_length" axes as well
    (`fn` must then be per token)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return fn(*rows, *replicated)
    lead = (row_axes(mesh, rows[0].shape[0]) or None,)
    if sequence:
        lead += (length_axes(mesh, rows[0].shape[1]) or None,)
    row_spec = P(*lead)
    out_shape = jax.eval_shape(fn, *rows, *replicated)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(*(row_spec for _ in rows), *(P() for _ in replicated)),
        out_specs=jax.tree.map(lambda _: row_spec, out_shape),
        check_vma=False,  # pallas_call outputs carry no varying-axes type (platform notes)
    )(*rows, *replicated)


def token_wise(fn: Callable, x, replicated: tuple = (), *, kernel: bool, token_dims: int):
    """fn(x_rows, *replicated) on x whose first `token_dims` dimensions are tokens ([N] or [B, T]):
    `fn` takes the tokens flattened into rows and returns arrays with the rows first, which come back
    with x's token dimensions. Under a mesh whose context axis splits T of [B, T, ...], merging B x T
    would make GSPMD gather every row's whole sequence, so the tokens stay [B, T] there: a `kernel`
    (Pallas) call per (batch, sequence) shard (`per_row_shard`), an XLA op once per row b (vmap).
    Elsewhere the tokens are merged (a kernel still per batch shard). `fn` must be per token."""

    def flat(lead: int):
        def run(x, *rep):
            out = fn(x.reshape(-1, *x.shape[lead:]), *rep)
            return jax.tree.map(lambda y: y.reshape(*x.shape[:lead], *y.shape[1:]), out)

        return run

    mesh = jax.sharding.get_abstract_mesh()
    sequence = token_dims >= 2 and not mesh.empty and not mesh.manual_axes and bool(length_axes(mesh, x.shape[1]))
    if kernel:
        return per_row_shard(flat(token_dims), (x,), replicated, sequence=sequence)
    if sequence:
        return jax.vmap(flat(token_dims - 1), in_axes=(0,) + (None,) * len(replicated))(x, *replicated)
    return flat(token_dims)(x, *replicated)
