"""ID3's options (``score_decay``, ``leaf_share``): each selects exactly what
docs/methods/id3.md says, checked against numpy, in the dense, compact, sharded-runner and
torch paths; the default stays the paper's ID3 (its state and leafwise path unchanged)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import optax_selective as osel
from optax_selective.methods import ID3, ID3State, LeafwiseMethod
from optax_selective.testing import check_method, default_params
from torch_bridge import get_selective_optimizer

LR = 0.5  # a power of two: lr * g is exact in both numpy and XLA
BUDGET, STEPS = 40, 4


def gradients(seed, params, n):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
            for _ in range(n)]


def reference(params, grads, *, budget, max_steps, decay=None, share=None, eps=1e-8):
    """numpy ID3 with the options (SGD steps on the selected entries): the masks after
    each update. Greedy in (score desc, global index asc) order under the per-leaf cap."""
    names = sorted(params)
    p = [np.asarray(params[n], np.float32).reshape(-1).copy() for n in names]
    masks = [np.zeros(x.size, bool) for x in p]
    avg = [np.zeros(x.size, np.float32) for x in p]
    cap = None if share is None else max(1, int(np.ceil(share * budget)))
    out = []
    for t, g in enumerate(grads):
        g = [np.asarray(g[n], np.float32).reshape(-1) for n in names]
        if t < max_steps:
            k = budget // max_steps + (1 if t < budget % max_steps else 0)
            s = [np.abs(gi) / (np.abs(pi) + np.float32(eps)) for gi, pi in zip(g, p)]
            if decay is not None:
                avg = [a * np.float32(decay) + si * np.float32(1 - decay) for a, si in zip(avg, s)]
                s = [a.copy() for a in avg]
            score = np.concatenate(s)
            leaf = np.concatenate([np.full(x.size, i) for i, x in enumerate(p)])
            local = np.concatenate([np.arange(x.size) for x in p])
            taken = np.concatenate(masks)
            held = [int(m.sum()) for m in masks]
            for j in np.lexsort((np.arange(score.size), -score)):
                if k == 0:
                    break
                if taken[j] or not np.isfinite(score[j]):
                    continue
                if cap is not None and held[leaf[j]] >= cap:
                    continue
                masks[leaf[j]][local[j]] = True
                held[leaf[j]] += 1
                k -= 1
        p = [pi - np.float32(LR) * np.where(m, gi, np.float32(0)) for pi, gi, m in zip(p, g, masks)]
        out.append([m.reshape(params[n].shape).copy() for m, n in zip(masks, names)])
    return out


def run_jax(params, grads, compact, **options):
    tx = osel.selective_id3(BUDGET, STEPS, inner=optax.sgd(LR), compact=compact, **options)
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(m) for m in jax.tree.leaves(osel.selected_mask(state))])
    return out, state, step


def assert_same(got, want):
    for t, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_array_equal(x, y, err_msg=f"after update {t}, leaf {i}")


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize(
    "options", [dict(leaf_share=0.45), dict(score_decay=0.5), dict(score_decay=0.5, leaf_share=0.45)],
    ids=["cap", "decay", "both"],
)
def test_options_select_what_the_numpy_rule_selects(options, compact):
    params = default_params()
    grads = gradients(3, params, STEPS + 1)
    got, state, step = run_jax(params, grads, compact, **options)
    decay, share = options.get("score_decay"), options.get("leaf_share")
    assert_same(got, reference(params, grads, budget=BUDGET, max_steps=STEPS, decay=decay, share=share))
    assert osel.budget_used(state) == BUDGET
    assert step._cache_size() == 1  # count, state and the average are arrays: no retracing


def test_leaf_cap_binds_where_plain_id3_would_exceed_it():
    params = default_params()
    grads = gradients(3, params, STEPS)
    plain, _, _ = run_jax(params, grads, False)
    capped, _, _ = run_jax(params, grads, False, leaf_share=0.45)
    cap = 18  # ceil(0.45 * 40)
    assert max(int(m.sum()) for m in plain[-1]) > cap  # the cap has something to do
    assert max(int(m.sum()) for m in capped[-1]) == cap


def test_score_decay_changes_the_picks_and_keeps_the_average_in_the_state():
    params = default_params()
    grads = gradients(5, params, STEPS)
    plain, _, _ = run_jax(params, grads, False)
    smoothed, state, _ = run_jax(params, grads, False, score_decay=0.9)
    assert any(not np.array_equal(a, b) for a, b in zip(plain[-1], smoothed[-1]))
    avg = state.method_state.score_avg
    assert [a.shape for a in avg] == [v.shape for v in jax.tree.leaves(params)]
    assert all(a.dtype == jnp.float32 for a in avg)


def test_default_is_the_paper_id3_state_and_leafwise_path():
    method = osel.methods.build("id3", budget=BUDGET, max_steps=STEPS)
    assert method.leafwise and isinstance(method, LeafwiseMethod)
    tx = osel.selective_id3(BUDGET, STEPS)
    state = tx.init(default_params()).method_state
    assert type(state) is ID3State and len(jax.tree.leaves(state)) == 1
    # an option turns the leafwise (one-parameter-at-a-time) path off: it needs the whole model
    assert not ID3(budget=BUDGET, max_steps=STEPS, score_decay=0.9).leafwise
    assert not ID3(budget=BUDGET, max_steps=STEPS, leaf_share=0.5).leafwise


def test_options_pass_the_conformance_check():
    report = check_method("id3", budget=30, max_steps=3, score_decay=0.5, leaf_share=0.4)
    assert report.budget_used == 30 and report.traces == 1 and report.torch_checked


@pytest.mark.parametrize("stream", [False, True], ids=["compact", "stream_grads"])
def test_torch_adamw_with_options_selects_what_jax_selects(stream):
    params = default_params()
    grads = gradients(7, params, STEPS + 1)
    options = dict(score_decay=0.5, leaf_share=0.45)
    want, _, _ = run_jax(params, grads, True, **options)
    # the masks do not depend on the inner optimizer; lr 0.5 SGD in JAX, AdamW(wd 0) in torch:
    # both change the selected entries only, and ID3's score reads |θ| of unselected ones
    ps = [torch.nn.Parameter(torch.from_numpy(np.array(v))) for v in jax.tree.leaves(params)]
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        ps, lr=1e-3, weight_decay=0.0, budget=BUDGET, max_steps=STEPS, stream_grads=stream,
        **options)
    got = []
    for g in grads:
        opt.zero_grad()
        sum((p * torch.from_numpy(g[k])).sum() for p, k in zip(ps, sorted(g))).backward()
        opt.step()
        got.append([np.asarray(m.numpy()) for m in opt.get_masks()])
    assert_same(got, want)


def test_sharded_runner_keeps_the_average_per_shard():
    from optax_selective._tree import LeafLayout
    from torch_bridge.distributed import ShardedMethodRunner

    params = default_params()
    names = sorted(params)
    leaves = [torch.from_numpy(np.array(params[n])) for n in names]
    layout = LeafLayout(tuple(names), tuple(tuple(x.shape) for x in leaves), (True,) * 3, (False,) * 3)
    grads = gradients(9, params, STEPS)
    runner = ShardedMethodRunner(ID3(budget=BUDGET, max_steps=STEPS, score_decay=0.5), layout, leaves)
    masks = runner.init(leaves)
    got = []
    for t, g in enumerate(grads):  # SGD on the selected entries, as the reference does
        gs = [torch.from_numpy(g[n]) for n in names]
        new = runner.update(t, range(3), masks, gs, leaves)
        masks = [new[i] for i in range(3)]
        for p, x, m in zip(leaves, gs, masks):
            p.sub_(torch.where(m, x, torch.zeros(())) * LR)
        got.append([m.numpy().copy() for m in masks])
    assert_same(got, reference(params, grads, budget=BUDGET, max_steps=STEPS, decay=0.5))
    with pytest.raises(ValueError, match="leaf_share is not supported on FSDP2"):
        ShardedMethodRunner(ID3(budget=BUDGET, max_steps=STEPS, leaf_share=0.5), layout, leaves).init(leaves)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(score_decay=1.0), ValueError, r"score_decay must be in \(0, 1\)"),
        (dict(score_decay=0.0), ValueError, r"score_decay must be in \(0, 1\)"),
        (dict(leaf_share=1.5), ValueError, r"leaf_share must be in \(0, 1\]"),
        (dict(leaf_share="0.1"), TypeError, "leaf_share must be a Python number"),
        (dict(score_decay=jnp.float32(0.9)), TypeError, "score_decay must be a Python number"),
    ],
)
def test_bad_option_values_are_refused_with_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        osel.selective_id3(BUDGET, STEPS, **kwargs)


def test_caps_too_small_for_the_budget_are_refused_at_init():
    tx = osel.selective_id3(BUDGET, STEPS, leaf_share=0.1)  # caps of 4: room for 12 < 40
    with pytest.raises(ValueError, match="at most 12 entries, fewer than the 40 to select"):
        tx.init(default_params())
