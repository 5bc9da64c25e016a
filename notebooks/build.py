"""Writes the tutorial notebooks (notebooks/*.ipynb) from the cells below, and with --execute runs
each top to bottom, saving the outputs (plots as PNG) so the notebooks render on GitHub.

    .venv/bin/python notebooks/build.py --execute          # rewrite and run all (full length)
    .venv/bin/python notebooks/build.py --execute 02       # only notebooks whose name contains "02"
    .venv/bin/python notebooks/build.py --markdown         # text edits only: keep the saved outputs

Edit the cells here, not the .ipynb files. LING_JAX_NOTEBOOK_FAST=1 in the environment shortens
the training loops (what CI runs, tests/test_notebooks.py); saved outputs come from full runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
# There is no public remote yet: "ling-jax/ling_jax" is a placeholder for the GitHub org/repo.
REPO = "ling-jax/ling_jax"
FAST_ENV = "LING_JAX_NOTEBOOK_FAST"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def install_cell(extra: str = "") -> str:
    spec = f"ling_jax{extra} @ git+https://github.com/{REPO}"
    return f'''# Install: in a local clone of the repository (this notebook in notebooks/), the clone itself;
# on a fresh Colab runtime, from GitHub. Nothing else is downloaded: data and models are made here.
import importlib.util, os, subprocess, sys

if importlib.util.find_spec("ling_jax") is None:
    local = os.path.exists("../pyproject.toml")
    target = ["-e", "..{extra}"] if local else ["{spec}"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *target], check=True)'''


def header(name: str, title: str, text: str) -> list:
    return [new_markdown_cell(f"# {title}\n\n{badge(name)}\n\n{text}")]


# --------------------------------------------------------------------------- 01 quickstart
def quickstart() -> list:
    return header(
        "01_quickstart",
        "ling_jax quickstart: a Ling 2.0 MoE model in a few cells",
        "A tour of the public API on a tiny Ling 2.0 (BailingMoeV2) model that runs on a CPU: a config, "
        "initialisation, a forward pass and what it returns, `jax.grad` with respect to the router and "
        "one expert, the expert-bias collection, and greedy and sampled generation. Runs in a minute or "
        "two on a 2-core CPU; no login, no download.",
    ) + [
        new_code_cell(install_cell()),
        new_markdown_cell(
            "## A config\n\n`ling_jax.configs` holds the presets (the same ones `ling-jax train --config NAME` "
            "uses). `get(name)` gives the whole ml_collections config (model, data, train, ...); "
            "`model_config(name)` gives its validated `ModelConfig`, the frozen dataclass every layer reads. "
            "`tiny` is the full architecture (a dense first layer, MoE layers with 16 routed experts in 4 "
            "groups + a shared expert, partial RoPE, QK-norm, one MTP layer) at 1.7 M parameters."
        ),
        new_code_cell(
            """import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import ling_jax

print("presets:", ling_jax.configs.names())
cfg = ling_jax.configs.model_config("tiny")
print(f"hidden {cfg.hidden_size}, layers {cfg.num_layers} ({cfg.num_dense_layers} dense + {cfg.num_moe_layers} MoE), "
      f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, {cfg.num_mtp_layers} MTP layer")
counts = ling_jax.count_params(cfg)
print(f"parameters: {counts.total:,} total, {counts.activated:,} activated per token (+ {counts.mtp_total:,} MTP)")"""
        ),
        new_markdown_cell(
            "A `ModelConfig` can also be written out directly, `ling_jax.ModelConfig(hidden_size=..., ...)`; a bad "
            "value is a `ConfigError` naming the field:"
        ),
        new_code_cell(
            """try:
    cfg.replace(num_experts_per_tok=32)
except ling_jax.ConfigError as e:
    print("ConfigError:", e)"""
        ),
        new_markdown_cell(
            "## Initialise and run\n\n`LingModel` is a Flax Linen module. `init` returns two collections: "
            "`params` (what the optimizer trains) and `expert_bias` (the aux-loss-free routing biases, updated "
            "from expert loads, never by gradients). Each parameter comes wrapped in a `LogicallyPartitioned` "
            "box that carries its logical axis names (`('embed', 'mlp')`, ...), which the sharding rules map to "
            "a device mesh. Every ling_jax function that takes variables accepts the boxes; `ling_jax.unbox` "
            "gives plain arrays for your own code."
        ),
        new_code_cell(
            """model = ling_jax.LingModel(cfg)
text = "def fibonacci(n):"
ids_BT = jnp.asarray([list(text.encode())], jnp.int32)   # byte tokenizer: ids 0..255 are UTF-8 bytes
variables = jax.jit(model.init)(jax.random.key(0), ids_BT)
print("collections:", list(variables))
box = variables["params"]["embedding"]
print(f"a boxed leaf: {type(box).__name__}, logical axes {box.names}, value {box.value.shape} {box.value.dtype}")
params = ling_jax.unbox(variables)["params"]
for path, leaf in jax.tree_util.tree_leaves_with_path(params)[:8]:
    print(f"  {jax.tree_util.keystr(path):60s} {leaf.shape}")"""
        ),
        new_markdown_cell(
            "The forward pass returns a `LingOutput`: next-token `logits` [B, T, V], the MTP layer's "
            "`mtp_logits` [M, B, T, V] (layer i predicts token t + i + 2), the hidden states, and per-layer "
            "router statistics (`router.counts_E` [MoE layers, E]: tokens routed to each expert)."
        ),
        new_code_cell(
            """out = jax.jit(model.apply)(variables, ids_BT)
for name in ("logits", "mtp_logits", "hidden_states", "final_hidden"):
    print(f"{name:14s} {getattr(out, name).shape}")
print("router.counts_E", out.router.counts_E.shape, "(each row sums to tokens x top-k =",
      int(out.router.counts_E[0].sum()), ")")
fig, ax = plt.subplots(figsize=(7, 2.5))
for layer, row in enumerate(np.asarray(out.router.counts_E)):
    ax.bar(np.arange(cfg.num_experts) + 0.4 * layer, row, width=0.4, label=f"MoE layer {layer}")
ax.set(xlabel="expert", ylabel="tokens routed", title="expert load of one forward pass (untrained)")
ax.legend(); plt.show()"""
        ),
        new_markdown_cell(
            "## `jax.grad` on the router and on one expert\n\nA loss is a plain function of `params`, so "
            "`jax.grad` gives a gradient tree of the same shape. The MoE layers are stacked over depth "
            "(`nn.scan`), so the router of every MoE layer sits in one array [L, D, E] and expert weights "
            "in [L, E, D, F]. An expert no token was routed to gets exactly zero gradient (so can one whose only "
            "tokens do not reach the loss: here the last position, which has no next token to predict)."
        ),
        new_code_cell(
            """def next_token_loss(params, ids_BT):
    logits = model.apply({"params": params, "expert_bias": variables["expert_bias"]}, ids_BT).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1).mean()

loss, grads = jax.jit(jax.value_and_grad(next_token_loss))(params, ids_BT)
moe_grads = grads["moe_stack"]["layers"]["moe"]
print(f"loss {float(loss):.3f} (log V = {np.log(cfg.vocab_size):.3f})")
print("router gradient", moe_grads["router"].shape, "norm", float(jnp.linalg.norm(moe_grads["router"])))
layer, expert = 0, int(np.argmax(out.router.counts_E[0]))
g = moe_grads["gate_proj"][layer, expert]
print(f"MoE layer {layer}, expert {expert} gate_proj gradient {g.shape}, norm {float(jnp.linalg.norm(g)):.2e}")
norms = np.asarray(jnp.linalg.norm(moe_grads["gate_proj"][layer], axis=(1, 2)))
fig, ax = plt.subplots(figsize=(7, 2.5))
ax.bar(range(cfg.num_experts), norms)
ax.set(xlabel="expert", ylabel="|grad gate_proj|", title=f"MoE layer {layer}: gradient per expert")
plt.show()
unused = np.asarray(out.router.counts_E[0]) == 0
print(f"experts {np.flatnonzero(unused).tolist()} got no token; their gradients are exactly zero:",
      bool(np.all(norms[unused] == 0)))"""
        ),
        new_markdown_cell(
            "Each layer is also a module on its own: `Attention`, `MLP`, `MoE`, `DecoderLayer`, `MTPLayer` in "
            "`ling_jax.layers`, built from the same `ModelConfig`. `layer_inputs` makes the rotary tables and "
            "masks the model would pass. Here the MoE block alone (its token mask defaults to all tokens real):"
        ),
        new_code_cell(
            """from ling_jax.layers.moe import MoE

moe = MoE(cfg)
x_BTD = jax.random.normal(jax.random.key(1), (2, 8, cfg.hidden_size))
moe_vars = ling_jax.unbox(jax.jit(moe.init)(jax.random.key(2), x_BTD))

def moe_loss(p):
    y_BTD, stats = moe.apply({**moe_vars, "params": p}, x_BTD)
    return jnp.mean(y_BTD ** 2)

g = jax.jit(jax.grad(moe_loss))(moe_vars["params"])
print({name: tuple(v.shape) for name, v in g.items() if name != "shared_experts"})
print("router gradient norm", float(jnp.linalg.norm(g["router"])))"""
        ),
        new_markdown_cell(
            "## The expert-bias collection\n\nLing 2.0 balances experts without an auxiliary loss: each MoE "
            "layer adds a bias per expert to the routing scores (only to choose the top-k, not to weight "
            "them), and after each step the bias of an overloaded expert goes down and that of an underloaded "
            "one goes up. The biases live in their own collection, so `jax.grad` over `params` never sees them. "
            "Below: raising one expert's bias sends more tokens to it."
        ),
        new_code_cell(
            """bias = variables["expert_bias"]
print(jax.tree.map(jnp.shape, ling_jax.unbox(bias)))
favoured = 3
boosted = jax.tree.map(lambda b: b.at[..., favoured].add(1.0), ling_jax.unbox(bias))
out_boosted = jax.jit(model.apply)({"params": params, "expert_bias": boosted}, ids_BT)
print(f"tokens routed to expert {favoured} per MoE layer: before", np.asarray(out.router.counts_E[:, favoured]),
      "after", np.asarray(out_boosted.router.counts_E[:, favoured]))"""
        ),
        new_markdown_cell(
            "## Generation\n\n`ling_jax.generate` decodes with a KV cache: greedy at `temperature=0`, else "
            "sampling with optional top-k / top-p; prompts in a batch may differ in length. The model is "
            "untrained, so the bytes are noise (notebook 02 trains one)."
        ),
        new_code_cell(
            """prompts = [list(b"def "), list(b"import ")]
greedy = ling_jax.generate(cfg, variables, prompts, max_new_tokens=24)
sampled = ling_jax.generate(cfg, variables, prompts, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=1)
def show(tokens):
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")
for p, g, s in zip(prompts, greedy.tokens, sampled.tokens):
    print(repr(show(p)), "greedy:", repr(show(g)), "| sampled:", repr(show(s)))"""
        ),
        new_markdown_cell(
            "Next: `02_training.ipynb` trains this model on real text; `03_checkpoints_and_planning.ipynb` "
            "exports it as a Hugging Face checkpoint and plans a TPU run."
        ),
    ]


# --------------------------------------------------------------------------- 02 training
def training() -> list:
    return header(
        "02_training",
        "Training a tiny Ling 2.0 from Python",
        "The same training system as `ling-jax train`, driven from Python: an ml_collections config, "
        "`ling_jax.train.loop.run`, a loss curve drawn while it trains, expert load per layer, resuming, "
        "and WSM (checkpoint merging instead of LR decay) with the held-out loss before and after. The data "
        "is the Python standard library's own source code (found on this machine, nothing downloaded).\n\n"
        f"**Length**: about 5-10 minutes on a 2-core CPU. Set the environment variable `{FAST_ENV}=1` before "
        "starting the kernel for a short run (a few steps per stage; CI runs it that way).",
    ) + [
        new_code_cell(install_cell()),
        new_markdown_cell(
            "## The config\n\n`ling_jax.configs.get('tiny')` is the preset `ling-jax train --config tiny` reads. "
            "Change fields as you would with `--config.train.steps=...` on the command line; "
            "`experiment_from_config` validates everything (a typo is an error naming the field)."
        ),
        new_code_cell(
            f"""import os, tempfile
from pathlib import Path
import numpy as np
import matplotlib.pyplot as plt
from IPython.display import clear_output, display
import ling_jax
from ling_jax.train.config import experiment_from_config
from ling_jax.train.loop import run
from ling_jax.train.metrics_log import read_metrics

FAST = os.environ.get("{FAST_ENV}") == "1"
STAGES = [4, 8] if FAST else [100, 200, 300]   # train to these steps, resuming between stages
config = ling_jax.configs.get("tiny")
config.train.update(batch_size=8, seq_len=128, log_every=2 if FAST else 10, eval_batches=1 if FAST else 8,
                    sample_tokens=0 if FAST else 120, peak_flops_per_device=1e11)  # skip the FLOP/s probe
config.checkpoint.update(every=2 if FAST else 20, keep=5)
config.data.max_tokens = 100_000 if FAST else 2_000_000
exp = experiment_from_config(config)
print(exp.model.num_layers, "layers,", exp.model.num_experts, "experts; batch", exp.train.batch_size,
      "x", exp.train.seq_len, "tokens; LR", exp.train.learning_rate, "after", exp.train.warmup_steps, "warmup steps")
workdir = Path(tempfile.mkdtemp()) / "run"
print("run directory:", workdir)"""
        ),
        new_markdown_cell(
            "## Train, with a live loss curve\n\n`run(experiment, workdir)` trains to `train.steps`, writing "
            "checkpoints, `metrics.jsonl` and TensorBoard logs into `workdir`. Called again on the same "
            "directory with more steps, it **resumes** from the newest checkpoint (with exactly the losses an "
            "uninterrupted run would have had). Training in stages and redrawing in between gives a live plot "
            "and exercises resume each time."
        ),
        new_code_cell(
            """fig, ax = plt.subplots(figsize=(8, 3.5))
for steps in STAGES:
    config.train.steps = steps
    result = run(experiment_from_config(config), workdir, progress=False)
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    ax.clear()
    ax.plot([r["step"] for r in records], [r["ce_loss"] for r in records], label="train (next token)")
    ax.axhline(result.unigram_entropy, ls="--", c="gray", label="unigram entropy of the corpus")
    for s in STAGES[: STAGES.index(steps)]:
        ax.axvline(s, c="k", lw=0.5, alpha=0.4)
    ax.set(xlabel="step", ylabel="nats / token", title=f"training loss (resumed at {STAGES[:-1]})")
    ax.legend(); clear_output(wait=True); display(fig)
    print(f"step {result.final_step}: train loss {result.final_loss:.3f}, held-out {result.heldout_loss:.3f}")
plt.close(fig)
if result.sample:  # the run ends by generating from train.sample_prompt ("def ")
    print("sample after training:", repr(result.sample))"""
        ),
        new_markdown_cell(
            "## Expert load per layer\n\nEach step logs, per MoE layer, the most loaded expert's load over "
            "the mean (1 = perfectly even) and the coefficient of variation. The aux-loss-free bias update "
            "brings both down as training goes on."
        ),
        new_code_cell(
            """layers = sorted({k.split("/")[1] for r in records for k in r if k.startswith("load_max_over_mean/")})
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
steps_ = [r["step"] for r in records]
for layer in layers:
    axes[0].plot(steps_, [r[f"load_max_over_mean/{layer}"] for r in records], label=layer)
    axes[1].plot(steps_, [r[f"load_cv/{layer}"] for r in records], label=layer)
axes[0].set(xlabel="step", ylabel="max load / mean load", title="busiest expert per MoE layer")
axes[1].set(xlabel="step", ylabel="CV of expert load", title="load spread per MoE layer")
axes[0].legend(); fig.tight_layout(); display(fig); plt.close(fig)"""
        ),
        new_markdown_cell(
            "## WSM: merge checkpoints instead of decaying the LR\n\nLing 2.0 trains at a constant learning "
            "rate after warmup (warmup-stable-merge) and gets the effect of an LR decay by averaging the last "
            "checkpoints with weights that emulate a decay curve (`ling_jax/train/merge_weights.py`; "
            "`ling-jax merge` on the command line). Below, the last K+1 checkpoints are merged with 1-sqrt "
            "weights and both models are scored on the held-out split."
        ),
        new_code_cell(
            """from jax.sharding import NamedSharding
from ling_jax.sharding import batch_spec
from ling_jax.train.loop import evaluate, experiment_datasets
from ling_jax.train.merge_weights import merge_coefficients, merge_pytrees
from ling_jax.train.run_dir import checkpointer_for, restore
from ling_jax.train.step import make_eval_step

exp = experiment_from_config(config)
steps = checkpointer_for(workdir, exp).all_steps()
window = min(4, len(steps) - 1)
chosen, weights = steps[-(window + 1):], merge_coefficients("1-sqrt", window)
states = [restore(workdir, exp, s) for s in chosen]
mesh, shardings = states[-1][3], states[-1][4]
merged = merge_pytrees([{"params": s[0].params, "expert_bias": s[0].expert_bias} for s in states], weights)
heldout = experiment_datasets(exp).heldout
eval_step = make_eval_step(exp.model, mesh, shardings)
batches = exp.train.eval_batches
def heldout_loss(params, bias):
    return evaluate(exp, params, bias, heldout, eval_step, NamedSharding(mesh, batch_spec()), batches)
last = states[-1][0]
before, after = heldout_loss(last.params, last.expert_bias), heldout_loss(merged["params"], merged["expert_bias"])
print("merged steps", chosen, "with weights", np.round(weights, 3))
print(f"held-out loss: last checkpoint {before:.4f}, WSM merge {after:.4f} ({after - before:+.4f})")
fig, ax = plt.subplots(figsize=(4, 2.5))
ax.bar(["last checkpoint", "WSM merge"], [before, after], color=["tab:gray", "tab:green"])
ax.set(ylabel="held-out nats / token", ylim=(min(before, after) * 0.98, max(before, after) * 1.01))
display(fig); plt.close(fig)"""
        ),
        new_markdown_cell(
            "WSM is meant for long constant-LR runs, where the loss flattens and the merge plays the part of "
            "the final decay. On a run of a few hundred steps the model is still improving fast, so "
            "checkpoints 80 steps old can be worse than the last and the merge can score worse, as it may "
            "above: try a smaller window (`merge_coefficients('1-sqrt', 1)`) or more steps.\n\n"
            "The merged model can be saved as a Hugging Face checkpoint with "
            "`ling_jax.save_checkpoint(exp.model, merged, path)` (notebook 03 does the round trip)."
        ),
    ]


# --------------------------------------------------------------------------- 03 checkpoints and planning
def checkpoints_and_planning() -> list:
    return header(
        "03_checkpoints_and_planning",
        "Checkpoints and planning: Hugging Face round trip, model sizes, a TPU memory plan",
        "Export a model as a Hugging Face BailingMoeV2 checkpoint and read it back bit for bit; the "
        "parameter counts of the published Ling 2.0 sizes (from shapes only, nothing allocated); and an "
        "ahead-of-time compile of the training step for a TPU slice on this CPU, with the memory each TPU "
        "device would need. The plan needs the `tpu` extra (libtpu, for the compiler only: no TPU is used).",
    ) + [
        new_code_cell(install_cell("[tpu]")),
        new_markdown_cell(
            "## Hugging Face export and import\n\n`save_checkpoint(cfg, variables, dir)` writes `config.json` "
            "and safetensors in the BailingMoeV2 layout (the one `transformers` loads with "
            "`trust_remote_code`); `load_checkpoint(dir)` returns the config and the variables."
        ),
        new_code_cell(
            """import json, subprocess, sys, tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import ling_jax

cfg = ling_jax.configs.model_config("tiny")
ids_BT = jnp.asarray([list(b"def main():")], jnp.int32)
variables = jax.jit(ling_jax.LingModel(cfg).init)(jax.random.key(0), ids_BT)   # boxed: accepted as is
out_dir = Path(tempfile.mkdtemp()) / "tiny-hf"
ling_jax.save_checkpoint(cfg, variables, out_dir)
for f in sorted(out_dir.iterdir()):
    print(f"  {f.name:24s} {f.stat().st_size:>10,} bytes")
print(json.dumps({k: v for k, v in json.loads((out_dir / "config.json").read_text()).items()
                  if k in ("architectures", "model_type", "num_experts", "num_experts_per_tok", "hidden_size")}))"""
        ),
        new_code_cell(
            """cfg2, loaded = ling_jax.load_checkpoint(out_dir)
original = ling_jax.unbox(variables)
same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), original, loaded)
print("config identical:", cfg2 == cfg, "| every tensor bit-identical:", all(jax.tree.leaves(same)))
logits = lambda v: jax.jit(ling_jax.LingModel(cfg).apply)(v, ids_BT).logits
print("max |logits difference|:", float(jnp.max(jnp.abs(logits(variables) - logits(loaded)))))"""
        ),
        new_markdown_cell(
            "## Parameter counts of the published sizes\n\n`count_params` reads shapes with `jax.eval_shape` "
            "(no memory is allocated, so Ling-1T is fine on a laptop). *Activated* counts the routed experts "
            "top-k of E; the MTP layer is reported apart, as the published totals exclude it."
        ),
        new_code_cell(
            """rows = []
for name in ("ling_mini_2", "ling_flash_2", "ling_1t"):
    c = ling_jax.count_params(ling_jax.configs.model_config(name))
    rows.append((name, c.total / 1e9, c.activated / 1e9, c.mtp_total / 1e9))
    print(f"{name:13s} total {c.total / 1e9:8.2f} B   activated {c.activated / 1e9:6.2f} B   "
          f"(MTP +{c.mtp_total / 1e9:.2f} B)")
fig, ax = plt.subplots(figsize=(6, 3))
x = np.arange(len(rows))
ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="total")
ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="activated per token")
ax.set(xticks=x, xticklabels=[r[0] for r in rows], yscale="log", ylabel="parameters (billions)")
ax.legend(); plt.show()"""
        ),
        new_markdown_cell(
            "## An ahead-of-time memory plan for a TPU slice\n\n`ling-jax plan` lowers and compiles the real "
            "training step for a TPU topology with libtpu's compiler, here on the CPU of this machine, and "
            "reports each device's memory next to an analytic estimate (run below as `ling-jax plan ...`). "
            "The tiny model on a v5p slice of 8 "
            "chips (2x2x2), sharded FSDP over all 8, keeps the example quick; the same command with "
            "`--config ling_1t --topology v5p:16x16x16 --search` plans Ling-1T. The last line of the output is "
            "JSON with every figure."
        ),
        new_code_cell(
            """cmd = [sys.executable, "-m", "ling_jax.cli", "plan", "--config", "tiny", "--topology", "v5p:2x2x2",
       "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.attention_impl=xla"]
proc = subprocess.run(cmd, capture_output=True, text=True)
assert proc.returncode == 0, proc.stderr
*report, last = proc.stdout.strip().splitlines()
print("\\n".join(report))
plan = json.loads(last)   # every figure above, as JSON"""
        ),
        new_markdown_cell(
            "(Attention is pinned to its XLA implementation here; on a TPU the default, `auto`, selects the "
            "splash-attention kernel.) The compiled figures are per device; the analytic estimate is "
            "computed from the sharding rules without compiling anything:"
        ),
        new_code_cell(
            """c, a = plan["compiled"], plan["analytic"]
parts = {"arguments": c["argument_bytes"], "outputs - aliased": c["output_bytes"] - c["alias_bytes"],
         "temporaries": c["temp_bytes"], "generated code": c["generated_code_bytes"]}
fig, ax = plt.subplots(figsize=(7, 2.8))
left = 0
for name, value in parts.items():
    ax.barh(["compiled"], [value / 2**20], left=left, label=name)
    left += value / 2**20
ax.barh(["analytic"], [a["total_bytes"] / 2**20], color="tab:gray", label="analytic estimate")
ax.set(xlabel=f"MiB per device (of {plan['hbm_bytes_per_device'] / 2**30:.0f} GiB HBM)",
       title=f"tiny on {plan['topology']}, mesh {plan['mesh']}: fits = {plan['fits']}")
ax.legend(fontsize=7, loc="lower right"); plt.show()"""
        ),
    ]


# --------------------------------------------------------------------------- 04 post-training and decoding
def posttraining_and_decoding() -> list:
    return header(
        "04_posttraining_and_decoding",
        "Post-training and fast decoding: think-on/off SFT, RL with LPO, MTP speculative decoding",
        "What turned Ling-1T into a reasoning model, at toy scale on a CPU: supervised fine-tuning on chat "
        "conversations in the two Ling modes (*detailed thinking on*: a `<think>` trace, then the answer; "
        "*off*: the answer alone), then reinforcement learning with LPO (sentence-level importance ratios) "
        "and the Evo-CoT rewards, and finally decoding with the model's own MTP layer drafting tokens that "
        "the main model verifies. Everything runs offline on the embedded arithmetic task "
        "(`ling_jax/tasks/arithmetic.py`): problems, answers, checker and think-on traces are made by the "
        "program.\n\n"
        f"**Length**: about 13 minutes on a 2-core CPU. Set the environment variable `{FAST_ENV}=1` before "
        "starting the kernel for a short run (a few steps per stage; CI runs it that way).",
    ) + [
        new_code_cell(install_cell()),
        new_markdown_cell(
            "## The task and the chat format\n\nProblems are 2-digit additions and subtractions. Which split "
            "a problem belongs to is a function of the problem (a hash), so training never sees a held-out "
            "problem. A think-on trace works column by column from the last digit, one *sentence* per "
            "column: LPO clips its importance ratio per sentence, and `sentence_unit_ids` finds them from "
            "the decoded text of each token (a unit ends at a token holding pause punctuation). Most think-on "
            "traces in the SFT data end with a filler sentence, *all done*, that the answer does not need: "
            "the SFT model learns to pad its reasoning, and RL's length reward has something to remove."
        ),
        new_code_cell(
            """import os, tempfile
from pathlib import Path
import jax, numpy as np
import matplotlib.pyplot as plt
from IPython.display import display
import ling_jax, ling_jax.rl
from ling_jax.data import chat
from ling_jax.data.tokenizer import load_tokenizer
from ling_jax.tasks import arithmetic

FAST = os.environ.get("FAST_ENV") == "1"
task = arithmetic.TaskConfig(max_digits=2)
problem = arithmetic.make_split("train", 1, seed=3, config=task)[0]
think_on, think_off = arithmetic.sft_trace(problem, think=True), arithmetic.sft_trace(problem, think=False)
print("problem:", problem.prompt, "=", problem.answer)
print("think-on reply: ", think_on, "| checker:", arithmetic.check(think_on, problem))
padded = arithmetic.sft_trace(problem, think=True, verbose=True)
print("padded think-on:", padded, "| checker:", arithmetic.check(padded, problem))
print("think-off reply:", think_off, "| a wrong reply:", arithmetic.check("12", problem))
tokenizer = load_tokenizer("byte")
rendered = chat.render(chat.conversation(problem.prompt, think_on, think=True), tokenizer)
n_loss = int(rendered.assistant_mask_L.sum())
print(f"\\nrendered for training ({len(rendered.ids_L)} tokens, the loss on the {n_loss} tokens the assistant wrote):")
print(tokenizer.decode(rendered.ids_L.tolist()))
pieces = [tokenizer.decode([t]) for t in tokenizer.encode(think_on)]
units = ling_jax.rl.sentence_unit_ids(pieces)
sentences = ["".join(p for p, u in zip(pieces, units) if u == k) for k in sorted(set(units))]
print("\\nLPO sentence units:", sentences)""".replace("FAST_ENV", FAST_ENV)
        ),
        new_markdown_cell(
            "## SFT: both modes from one run\n\n`ling-jax sft --workdir W` runs the `tiny_sft` preset: the tiny "
            "model trained from scratch on rendered conversations (three quarters think-on, three quarters of "
            "those padded with the filler sentence, a quarter think-off) packed into "
            "rows with segment ids, the loss on assistant tokens only, with the same train step, checkpoints, "
            "metrics and resume as pre-training. `run_sft` is the same from Python; at the end it measures "
            "greedy held-out accuracy in both modes."
        ),
        new_code_cell(
            """from ling_jax.posttrain.sft import run_sft
from ling_jax.train.metrics_log import read_metrics

root = Path(tempfile.mkdtemp())
sft_config = ling_jax.configs.get("tiny_sft")
if FAST:
    sft_config.train.update(steps=6, log_every=2, eval_batches=1)
    sft_config.checkpoint.update(every=3)
    sft_config.sft.update(eval_problems=20, eval_max_new_tokens=24)
sft = run_sft(sft_config, root / "sft", progress=False)
print({k: round(v, 3) for k, v in sft.accuracy.items()})
records = [r for r in read_metrics(root / "sft" / "metrics.jsonl") if "loss" in r]
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot([r["step"] for r in records], [r["ce_loss"] for r in records])
ax.set(xlabel="step", ylabel="nats / assistant token", yscale="log", title="SFT loss")
display(fig); plt.close(fig)"""
        ),
        new_markdown_cell(
            "## RL: sample, score, update\n\n`ling-jax rl --init W1 --workdir W2` runs the `tiny_rl` preset. "
            "Each iteration samples G completions for each of P think-on prompts with the project's jitted KV-cache "
            "sampler (recording each token's log-prob), scores them with the Evo-CoT rewards (correctness, "
            "the `<think>`-in-think-off format penalty and the group length reward, paid in groups with a correct "
            "reply), turns rewards into group "
            "advantages and takes `rl.updates_per_batch` clipped policy-gradient steps. "
            "`rl.objective` picks the ratio's unit: `lpo` (sentences), `grpo` (tokens) or `gspo` (the whole "
            "reply)."
        ),
        new_code_cell(
            """from ling_jax.rl.config import rl_from_config
from ling_jax.rl.loop import default_rewards, run as run_rl

rl_config = ling_jax.configs.get("tiny_rl")
rl_config.rl.init = str(root / "sft")
if FAST:
    rl_config.rl.update(iterations=3, prompts_per_iteration=4, group_size=4, heldout_problems=20, eval_batch_size=20)
exp, rl = rl_from_config(rl_config)
result = run_rl(exp, rl, root / "rl", progress=False)
held = [r for r in result.records if "heldout_accuracy" in r]
print(f"held-out accuracy: {result.heldout_first:.3f} (SFT) -> {result.heldout_last:.3f} (after RL)")
length_first, length_last = held[0]["heldout_response_length"], held[-1]["heldout_response_length"]
print(f"mean held-out reply: {length_first:.2f} -> {length_last:.2f} tokens")"""
        ),
        new_code_cell(
            """recs = result.records
it = [r["step"] for r in recs]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].plot(it, [r["reward"] for r in recs], label="total", lw=2)
for name in sorted(k for k in recs[0] if k.startswith("reward/")):
    axes[0].plot(it, [r[name] for r in recs], label=name.split("/")[1], alpha=0.7)
axes[0].set(xlabel="iteration", title="reward per function"); axes[0].legend(fontsize=7)
held = [(r["step"], r["heldout_accuracy"]) for r in recs if "heldout_accuracy" in r]
axes[1].plot(it, [r["train_accuracy"] for r in recs], label="sampled (train prompts)")
axes[1].plot(*zip(*held), "o-", label="greedy, held-out")
axes[1].set(xlabel="iteration", title="accuracy"); axes[1].legend(fontsize=7)
axes[2].plot(it, [r["response_length"] for r in recs], label="response length")
ax2 = axes[2].twinx(); ax2.plot(it, [r["clip_fraction"] for r in recs], c="tab:red", label="clip fraction")
axes[2].set(xlabel="iteration", title="length (tokens) and clip fraction")
fig.tight_layout(); display(fig); plt.close(fig)"""
        ),
        new_markdown_cell(
            "Reward functions compose: each has the shape `fn(prompts, completions, **columns) -> "
            "list[float]` and `ling_jax.rl.score` sums them with their weights (a function that raises or "
            "returns NaN or the wrong count is an error naming it). Here a toy reward for replies ending in "
            "an even digit joins the defaults, scored on four replies to one problem (one group):"
        ),
        new_code_cell(
            """problem = arithmetic.Problem(47, 38, "+")
replies = [arithmetic.sft_trace(problem, think=True), "85",            # right, with and without a trace
           "<think>7+8+0=14,4+3+1=08</think>84", "84"]                  # wrong

def even_ending(prompts, completions, **_):
    return [1.0 if c.strip()[-1:] in "02468" else 0.0 for c in completions]

rewards = default_rewards(rl) + [ling_jax.rl.Reward("even_ending", even_ending, weight=0.1)]
columns = dict(problem=[problem] * 4, group=[0] * 4, think=[True] * 4,
               lengths=[len(tokenizer.encode(r)) + 1 for r in replies])
total, parts = ling_jax.rl.score(rewards, [problem.prompt] * 4, replies, **columns)
for i, reply in enumerate(replies):
    terms = "  ".join(f"{name} {values[i]:+.2f}" for name, values in parts.items())
    print(f"{reply:38s} total {round(float(total[i]), 3) + 0.0:+.3f}  {terms}")
print("group advantages:", ling_jax.rl.group_advantages(total, 4).round(2))"""
        ),
        new_markdown_cell(
            "A small weight does not make a reward small in training: advantages are normalised within "
            "each group, so in a group where every reply is wrong, whatever else differs (the toy reward, "
            "or the length) alone decides the ranking, at full size. That is why the length reward is "
            "paid only in groups with a correct reply (`rl.length_solved_groups_only`); "
            "benchmarks/README.md shows the policy that learns to stop thinking without it."
        ),
        new_markdown_cell(
            "The objective itself is one function, `ling_jax.rl.policy_loss`: the same clipped surrogate "
            "with the ratio taken per token, per sentence or per sequence. With one set of log-probs, the "
            "three levels clip different shares of the reply:"
        ),
        new_code_cell(
            """rng = np.random.default_rng(0)
B, T = 4, 12
old = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
new = old + rng.normal(0, 0.05, (B, T)).astype(np.float32)
mask = np.ones((B, T), np.float32); mask[:, 10:] = 0                 # padding after 10 tokens
units = np.repeat(np.arange(4), 3)[None].repeat(B, 0)                 # sentences of 3 tokens
adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
for level in ling_jax.rl.LEVELS:
    eps_low, eps_high = ling_jax.rl.DEFAULT_EPS[level]
    loss, stats = ling_jax.rl.policy_loss(new, old, adv, mask, units, level=level, eps_low=eps_low, eps_high=eps_high)
    print(f"{level:9s} eps {eps_low}/{eps_high}: loss {float(loss):+.4f}, "
          f"clip fraction {float(stats['clip_fraction']):.2f}")"""
        ),
        new_markdown_cell(
            "## Fast decoding: the MTP layer drafts, the model verifies\n\nThe MTP layer trained alongside "
            'the model predicts the token after next. `generate(..., speculative="mtp", draft_tokens=k)` '
            "lets it draft k tokens, the main model checks all of them in one forward, and the accepted "
            "prefix plus one token of the model's own are kept. Greedy output is exactly plain greedy "
            "output; fewer main-model forwards are needed per token the more drafts are accepted."
        ),
        new_code_cell(
            """from ling_jax.posttrain.accuracy import heldout_problems, prompt_ids
from ling_jax.train.init_from import load_init_variables

policy = load_init_variables(root / "rl", exp.model)
problems = heldout_problems(8 if FAST else 64, task)
prompts = [prompt_ids(p, tokenizer, think=True) for p in problems]
stop = [chat.role_end_id(tokenizer)]
plain = ling_jax.generate(exp.model, policy, prompts, max_new_tokens=48, stop_tokens=stop)
print("a think-on reply:", repr(tokenizer.decode(plain.tokens[0, : plain.lengths[0]].tolist())))
rows = []
for k in (1, 2, 3):
    spec = ling_jax.generate(exp.model, policy, prompts, max_new_tokens=48, stop_tokens=stop,
                             speculative="mtp", draft_tokens=k)
    assert (spec.tokens == plain.tokens).all(), "speculative greedy must equal plain greedy"
    forwards = max(int(spec.forward_steps.sum()), 1)   # a row that stops at once makes no decode forward
    acceptance = spec.accepted_drafts.sum() / (k * forwards)
    per_forward = spec.lengths.sum() / forwards
    rows.append((k, acceptance, per_forward))
    print(f"k={k}: the same tokens as plain greedy; acceptance {acceptance:.2f}, "
          f"tokens per main-model forward {per_forward:.2f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].bar([str(r[0]) for r in rows], [r[1] for r in rows])
axes[0].set(xlabel="draft tokens k", title="acceptance rate")
axes[1].bar([str(r[0]) for r in rows], [r[2] for r in rows], color="tab:green")
axes[1].axhline(plain.lengths.sum() / max(int(plain.forward_steps.sum()), 1), c="gray", ls="--", label="plain decoding")
axes[1].set(xlabel="draft tokens k", title="tokens per main-model forward"); axes[1].legend()
fig.tight_layout(); display(fig); plt.close(fig)"""
        ),
        new_markdown_cell(
            "On the command line: `ling-jax generate --workdir W2 --speculative mtp --draft-tokens 2 --prompt ...` "
            "streams the reply and ends with a line of tokens/s and acceptance; `benchmarks/decode.py` measures "
            "the speed-up over plain decoding."
        ),
    ]


NOTEBOOKS = {
    "01_quickstart": quickstart,
    "02_training": training,
    "03_checkpoints_and_planning": checkpoints_and_planning,
    "04_posttraining_and_decoding": posttraining_and_decoding,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1200) -> float:
    """Runs `nb` in place from notebooks/ (as a reader would); returns the wall time in seconds."""
    from nbclient import NotebookClient

    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run each notebook and save its outputs")
    parser.add_argument(
        "--markdown", action="store_true", help="only refresh the markdown cells of the saved notebooks (no run)"
    )
    parser.add_argument("only", nargs="*", help="substrings of the notebook names to build (default: all)")
    args = parser.parse_args()
    for name in NOTEBOOKS:
        if args.only and not any(s in name for s in args.only):
            continue
        nb = build(name)
        if args.markdown:  # keep the saved code cells and outputs; they must still be the ones built here
            saved = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
            if [(c.cell_type, c.source) for c in saved.cells if c.cell_type == "code"] != [
                (c.cell_type, c.source) for c in nb.cells if c.cell_type == "code"
            ] or len(saved.cells) != len(nb.cells):
                sys.exit(f"{name}: code cells changed; rerun with --execute")
            for old, new in zip(saved.cells, nb.cells):
                old.source = new.source
            nb = saved
        elif args.execute:
            seconds = execute(nb)
            mode = "fast" if os.environ.get(FAST_ENV) == "1" else "full"
            print(f"{name}: executed ({mode}) in {seconds:.0f} s", file=sys.stderr)
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
