"""Compile time of the real train step versus depth: 8 layers against 80 layers of the same width.

Both stacks are `nn.scan`s, so XLA compiles one layer body per stack whatever the depth; the
80-layer step should compile within 1.5x the 8-layer one. The model is Ling-1T's layout (4 dense
layers, then MoE layers, 1 MTP layer, 256 experts top-8 in 8 groups, GQA 8:1, head_dim 128, full
remat, dense dispatch) at a narrower width: hidden 1024, expert width 256 (granularity 8 as in
Ling 2.0), dense FFN 2304, vocabulary 32,768, 4 sequences of 2,048 tokens per device. Compiled ahead
of time for a TPU topology (libtpu, no TPU needed); without libtpu
it falls back to 8 emulated CPU devices and says so.

    python benchmarks/compile_depth.py                          # v5p:2x2x2, mesh fsdp=8, 2 repeats
    python benchmarks/compile_depth.py --topology v5p:4x4x4 --fsdp 16 --expert 4

Each variant is compiled --repeats times (alternating, fresh jit each time); the minimum is
reported (a shared machine only ever adds time). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ling_jax.plan.topology import libtpu_missing_reason, parse_topology  # noqa: E402

CPU_DEVICES = 8
MAX_RATIO = 1.5  # nn.scan: compile time nearly independent of depth


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p:2x2x2")
    p.add_argument("--depths", default="8,80", help="two main-stack depths, shallow first")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--expert", type=int, default=1)
    p.add_argument("--seqs_per_device", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


def experiment(depth: int, hidden: int, batch: int, seq_len: int, mesh: dict):
    from ling_jax.train.config import base_config, experiment_from_config

    config = base_config()
    config.model.update(
        vocab_size=32768,
        hidden_size=hidden,
        num_layers=depth,
        num_heads=hidden // 128,
        num_kv_heads=hidden // 1024,
        head_dim=128,
        intermediate_size=hidden * 9 // 4,
        num_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        moe_intermediate_size=hidden // 4,
        first_k_dense_replace=4,
        num_mtp_layers=1,
        max_position_embeddings=seq_len,
        dtype="bfloat16",
        remat_policy="full",
        scan_layers=True,
        moe_dispatch="dense",  # partitions over the batch at any mesh (see benchmarks/README.md)
    )
    config.train.update(batch_size=batch, seq_len=seq_len)
    config.mesh.update(**mesh)
    return experiment_from_config(config)


def main(argv=None):
    args = parse_args(argv)
    missing = libtpu_missing_reason()
    if missing:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CPU_DEVICES}"
        )
        print(f"libtpu unavailable ({missing}): compiling for {CPU_DEVICES} emulated CPU devices instead")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only described, never used
    import jax

    from benchmarks.common import print_json_line
    from ling_jax.plan.compiled import compile_train_step
    from ling_jax.plan.topology import topology_devices

    if missing:
        devices, target = jax.devices("cpu")[:CPU_DEVICES], f"cpu x{CPU_DEVICES}"
    else:
        devices, target = topology_devices(parse_topology(args.topology)), args.topology
    n = len(devices)
    mesh = {"data": n // (args.fsdp * args.expert), "fsdp": args.fsdp, "expert": args.expert, "model": 1}
    depths = [int(d) for d in args.depths.split(",")]
    batch = args.seqs_per_device * n
    print(f"train step compile time on {target}, mesh {mesh}, hidden {args.hidden}, batch {batch} x {args.seq_len}")
    times = {d: [] for d in depths}
    for _ in range(args.repeats):
        for d in depths:
            plan = compile_train_step(experiment(d, args.hidden, batch, args.seq_len, mesh), mesh, devices)
            status = "" if plan.error is None else f" ({plan.error[:80]})"
            print(f"  {d:>3} layers: lower {plan.lower_seconds:6.1f} s, compile {plan.compile_seconds:6.1f} s{status}")
            times[d].append(plan.lower_seconds + plan.compile_seconds)
    shallow, deep = (min(times[d]) for d in depths)
    ratio = deep / shallow
    verdict = "OK" if ratio <= MAX_RATIO else f"ABOVE {MAX_RATIO}"
    print(f"{depths[1]} vs {depths[0]} layers: {deep:.1f} s / {shallow:.1f} s = {ratio:.2f}x ({verdict})")
    print_json_line(
        {
            "target": target,
            "mesh": mesh,
            "hidden": args.hidden,
            "depths": depths,
            f"seconds_{depths[0]}": shallow,
            f"seconds_{depths[1]}": deep,
            "ratio": ratio,
            "max_ratio": MAX_RATIO,
            "libtpu": missing is None,
        }
    )
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
