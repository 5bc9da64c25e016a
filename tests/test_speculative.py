"""MTP self-speculative decoding (`generate(..., speculative="mtp", draft_tokens=k)`).

- Greedy: exactly the plain greedy tokens (and log-probs) for k = 1, 2, 3 and batches of prompts of
  different lengths, on both golden-vector checkpoints (tiny_yarn has no MTP layer: a random one is
  added, which any draft may be) and on a briefly trained tiny model that accepts most drafts.
- Sampling: a chi-square test on an 8-token vocabulary: speculative and plain sampling at
  temperature 1 with top-p both match the model's exact distribution of the first two tokens.
- Bad input: errors naming the argument.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_variables, tiny_config
from scipy import stats

from ling_jax.decoding.generate import generate
from ling_jax.decoding.sampling import filter_logits
from ling_jax.loss import causal_lm_targets, lm_loss
from ling_jax.model import LingModel


def _prompts(fx, lengths=(7, 3, 5)):
    """Prompts of different lengths cut from the fixture's own generation prompt."""
    prompt = np.asarray(fx.expected["gen_prompt"])[0]
    return [prompt[:n].tolist() for n in lengths]


def _with_mtp(fx):
    """The fixture's config and variables; a random MTP layer 0 added where the fixture has none."""
    if fx.config.num_mtp_layers:
        return fx.config, fx.variables
    cfg = dataclasses.replace(fx.config, num_mtp_layers=1)
    extra = random_variables(cfg, seed=7)
    variables = {c: dict(fx.variables[c]) for c in fx.variables}
    for c in variables:
        variables[c]["mtp_0"] = extra[c]["mtp_0"]
    return cfg, variables


def _assert_same(spec, plain):
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)


N_NEW = 10


def test_greedy_equals_plain_on_tiny_mtp(tiny_mtp):
    """The fast case: the real MTP checkpoint, k = 2, three prompt lengths."""
    cfg, variables = _with_mtp(tiny_mtp)
    prompts = _prompts(tiny_mtp)
    plain = generate(cfg, variables, prompts, max_new_tokens=N_NEW)
    spec = generate(cfg, variables, prompts, max_new_tokens=N_NEW, speculative="mtp", draft_tokens=2)
    _assert_same(spec, plain)
    assert np.all(spec.forward_steps >= 1) and np.all(spec.forward_steps <= N_NEW - 1)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_plain_on_both_fixtures(ref_fixture, k):
    cfg, variables = _with_mtp(ref_fixture)
    prompts = _prompts(ref_fixture, (9, 2, 6, 4))
    plain = generate(cfg, variables, prompts, max_new_tokens=N_NEW)
    spec = generate(cfg, variables, prompts, max_new_tokens=N_NEW, speculative="mtp", draft_tokens=k)
    _assert_same(spec, plain)


# --------------------------------------------------------------------------- a trained tiny model
def _train_cycle_model(steps=150):
    """A tiny Ling (vocab 64) trained briefly on walks of a random successor table, where each token
    has a likely (0.8) and an unlikely successor: the main model and its MTP layer both learn it, so
    drafts are mostly, not always, accepted."""
    cfg = tiny_config(num_layers=2)
    rng = np.random.default_rng(0)
    succ = np.stack([rng.permutation(60), rng.permutation(60)], axis=1)

    def walks(n, T):
        x = np.zeros((n, T), np.int32)
        x[:, 0] = rng.integers(0, 60, n)
        for t in range(1, T):
            x[:, t] = succ[x[:, t - 1], (rng.random(n) > 0.8).astype(int)]
        return x

    variables = random_variables(cfg, seed=3)
    opt = optax.adam(3e-3)
    opt_state = opt.init(variables["params"])

    @jax.jit
    def step(params, opt_state, ids):
        def loss_fn(p):
            out = LingModel(cfg).apply({"params": p, "expert_bias": variables["expert_bias"]}, ids)
            targets, mask = causal_lm_targets(ids)
            return lm_loss(out, targets, mask, mtp_weight=1.0)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = variables["params"]
    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state, jnp.asarray(walks(16, 24)))
    return cfg, {"params": params, "expert_bias": variables["expert_bias"]}, walks


@pytest.fixture(scope="module")
def trained():
    return _train_cycle_model()


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_plain_on_a_trained_model(trained, k):
    cfg, variables, walks = trained
    prompts = [w[:n].tolist() for w, n in zip(walks(4, 12), (11, 4, 8, 1), strict=True)]
    plain = generate(cfg, variables, prompts, max_new_tokens=24)
    spec = generate(cfg, variables, prompts, max_new_tokens=24, speculative="mtp", draft_tokens=k)
    _assert_same(spec, plain)
    rate = spec.accepted_drafts.sum() / (k * spec.forward_steps.sum())
    assert rate > 0.3, f"acceptance {rate:.2f}: the trained draft should be accepted often"
    assert np.all(spec.forward_steps < spec.lengths - 1), spec.forward_steps  # fewer verify steps than tokens
    # Stop tokens: rows stop at different times, mid-chunk; still the plain output.
    stop = [int(plain.tokens[0, 5]), int(plain.tokens[2, 9])]
    plain = generate(cfg, variables, prompts, max_new_tokens=24, stop_tokens=stop)
    spec = generate(cfg, variables, prompts, max_new_tokens=24, stop_tokens=stop, speculative="mtp", draft_tokens=k)
    _assert_same(spec, plain)
    assert len(set(plain.lengths.tolist())) > 1, plain.lengths


# --------------------------------------------------------------------------- sampling distribution
@pytest.mark.slow
def test_speculative_sampling_matches_the_model_distribution():
    """8-token vocabulary, 6,000 rows of one prompt, temperature 1 with top-p 0.9: the joint
    distribution of the first two generated tokens (64 cells) from plain and from speculative
    sampling (k = 2, random MTP layer: many rejections, so the residual draws matter) each pass a
    chi-square goodness-of-fit test against the exact filtered model distribution; speculative
    sampling with the draft's own distribution as the target would fail it."""
    cfg = tiny_config(vocab_size=8, eos_token_id=6, pad_token_id=7)
    variables = random_variables(cfg, seed=11)
    prompt, rows, top_p = [1, 4, 2], 6000, 0.9

    def dist(ids):
        logits = LingModel(cfg).apply(variables, jnp.asarray(ids), with_mtp=False).logits[:, -1]
        return np.asarray(jax.nn.softmax(filter_logits(logits, temperature=1.0, top_k=0, top_p=top_p), -1), np.float64)

    p1 = dist([prompt])[0]
    p2 = dist([prompt + [t] for t in range(8)])
    expected = (p1[:, None] * p2).ravel()
    kw = dict(max_new_tokens=3, temperature=1.0, top_p=top_p)
    for name, out in (
        ("plain", generate(cfg, variables, [prompt] * rows, seed=1, **kw)),
        ("speculative", generate(cfg, variables, [prompt] * rows, seed=2, speculative="mtp", draft_tokens=2, **kw)),
    ):
        observed = np.bincount(out.tokens[:, 0] * 8 + out.tokens[:, 1], minlength=64)
        keep = expected > 0
        assert observed[~keep].sum() == 0, f"{name}: tokens outside the top-p set"
        chi2 = ((observed[keep] - rows * expected[keep]) ** 2 / (rows * expected[keep])).sum()
        p_value = stats.chi2.sf(chi2, keep.sum() - 1)
        assert p_value > 1e-3, f"{name}: chi2 {chi2:.1f} over {keep.sum()} cells, p = {p_value:.2g}"
        if name == "speculative":
            assert out.accepted_drafts.sum() < 2 * out.forward_steps.sum(), "some drafts must be rejected"


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(speculative="mtp", draft_tokens=0), r"draft_tokens must be positive, got 0"),
        (dict(speculative="mtp", draft_tokens=1.5), r"draft_tokens must be an integer, got float 1.5"),
        (dict(speculative="eagle"), r"speculative must be one of \(None, 'mtp'\), got 'eagle'"),
        (dict(speculative="mtp", prompts=[[1, 64]]), r"prompt 0: token id 64"),
        (dict(speculative="mtp", max_new_tokens=62), r"prompt length 3 \+ max_new_tokens 62 exceeds max_position"),
    ],
    ids=["k-zero", "k-fractional", "unknown-mode", "id-out-of-range", "prompt-too-long"],
)
def test_speculative_errors(tiny_cfg, tiny_vars, kwargs, match):
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(tiny_cfg, tiny_vars, **kwargs)


def test_speculative_needs_an_mtp_layer(gen_cfg, gen_vars):
    with pytest.raises(ValueError, match=r"speculative='mtp'.*num_mtp_layers=0"):
        generate(gen_cfg, gen_vars, [[1, 2]], max_new_tokens=4, speculative="mtp")


# --------------------------------------------------------------------------- mesh
MESH_SCRIPT = """
import sys, json
sys.path.insert(0, "tests")
import jax, numpy as np
from conftest import tiny_config, random_variables
from ling_jax.decoding.generate import generate
from ling_jax.sharding.mesh import build_mesh
cfg = tiny_config(num_layers=2)
v = random_variables(cfg, seed=4)
prompts = [[5, 17, 3, 40, 22], [9, 31, 2], [7], [1, 2, 3, 4]]
mesh = build_mesh({"data": 2, "fsdp": 2, "expert": 1, "model": 1})
same = []
for kw in ({}, {"speculative": "mtp", "draft_tokens": 2}):
    a = generate(cfg, v, prompts, max_new_tokens=8, **kw)
    b = generate(cfg, v, prompts, max_new_tokens=8, mesh=mesh, **kw)
    same.append(bool(np.array_equal(a.tokens, b.tokens)) and bool(np.allclose(a.logprobs, b.logprobs, atol=1e-5)))
try:
    generate(cfg, v, prompts[:3], max_new_tokens=8, mesh=mesh)
    error = ""
except ValueError as e:
    error = str(e)
print(json.dumps({"same": same, "error": error}))
"""


@pytest.mark.slow
def test_generate_on_a_mesh_equals_one_device():
    """4 emulated devices, batch split over data x fsdp: plain and speculative give the one-device
    tokens and log-probs; a batch that does not split evenly is refused naming the mesh."""
    import json
    import subprocess
    import sys

    from multidevice.common import REPO_ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        cwd=REPO_ROOT,
        env=subprocess_env(4),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"] == [True, True]
    assert "mesh: 3 prompts do not split evenly over the mesh's batch axes (4 devices)" in result["error"]
