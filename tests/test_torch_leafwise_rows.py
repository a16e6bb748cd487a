"""LeafwiseSelector's rows: each chunk's row maxima pick the rows that can hold a candidate,
only those rows are scored, and the entries are exactly the NumPy reference's, in its order
(best first, ties to the lower global index), whatever the chunking, the offer order, the
floor and the ties."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from optax_selective.methods import ID3  # noqa: E402
from tests._reference import numpy_top_k  # noqa: E402
from torch_bridge import leafwise  # noqa: E402
from torch_bridge.leafwise import LeafwiseSelector  # noqa: E402

SIZES = (37, 16, 1, 250, 33)  # not multiples of the row length: partial last rows


def leaves(seed, distinct):
    rng = np.random.default_rng(seed)
    grads = [rng.integers(-distinct, distinct + 1, n).astype(np.float32) for n in SIZES]
    grads[3][[5, 100]] = [np.nan, np.inf]  # never chosen
    grads[3][200:] = 0.0  # a run of zero scores: eligible, tied
    params = [np.where(rng.random(n) < 0.5, 1.0, 2.0).astype(np.float32) for n in SIZES]
    selected = [np.flatnonzero(rng.random(n) < 0.2) for n in SIZES]
    return grads, params, selected


def reference(grads, params, selected, k):
    scores = []
    for g, p, sel in zip(grads, params, selected):
        s = (np.abs(g) / (np.abs(p) + np.float32(1e-8))).astype(np.float32)
        s[~np.isfinite(s)] = -np.inf
        s[sel] = -np.inf
        scores.append(s)
    masks = numpy_top_k(scores, k)
    flat = np.concatenate(scores)
    offsets = np.cumsum([0, *SIZES])
    chosen = np.concatenate([np.flatnonzero(m) + o for m, o in zip(masks, offsets)])
    order = chosen[np.lexsort((chosen, -flat[chosen]))]  # best first, then lower index
    out = {}
    for i in range(len(SIZES)):
        mine = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
        if mine.size:
            out[i] = mine.tolist()
    return out


@pytest.mark.parametrize("chunk", [1, 7, 40, 1 << 24])
@pytest.mark.parametrize("distinct", [2, 1000])  # 2: ties everywhere, at the floor too
@pytest.mark.parametrize("budget", [6, 90])  # 90: k_max larger than most chunks' rows
def test_entries_and_their_order_equal_the_reference(chunk, distinct, budget):
    m = ID3(budget=budget, max_steps=2)
    grads, params, selected = leaves(chunk + distinct + budget, distinct)
    sel = LeafwiseSelector(m, SIZES, chunk=chunk)
    assert sel.row == 16
    for k in (m.k_max, 1):
        for i in (3, 0, 4, 2, 1):  # any order, as backward produces them
            g = torch.from_numpy(grads[i].copy())
            sel.offer(i, g, torch.from_numpy(params[i]), torch.from_numpy(selected[i]))
            assert np.array_equal(g.numpy(), grads[i], equal_nan=True)  # put back
        got = sel.finish(k)
        want = reference(grads, params, selected, k)
        assert {i: v[0].tolist() for i, v in got.items()} == want
        for i, (idx, vals) in got.items():
            assert idx.dtype == torch.int64
            assert vals.tolist() == grads[i][idx.numpy()].astype(np.float64).tolist()


def test_only_rows_that_can_hold_a_candidate_are_scored(monkeypatch):
    """Once the floor is set, a chunk whose best row is below it scores no row at all, and
    one with a few rows at or above it scores those rows only."""
    m = ID3(budget=4, max_steps=1)
    n = 16 * 64
    sel = LeafwiseSelector(m, [n, n, n], chunk=n)
    scored = []
    real = sel._score_rows
    monkeypatch.setattr(sel, "_score_rows", lambda xs, rows: (scored.append(rows.tolist()),
                                                              real(xs, rows))[1])
    g = torch.full((n,), 0.5)
    g[[3, 40, 41, 700]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    sel.offer(0, g, torch.ones(n))
    assert scored[-1] == [0, 1, 2, 43]  # the 4 best rows (k_max = 4; ties: lower row)
    assert sel._floor == 6.0
    sel.offer(1, torch.full((n,), 0.25), torch.ones(n))  # every row below the floor
    assert len(scored) == 1
    g2 = torch.full((n,), 0.25)
    g2[[17, 500]] = torch.tensor([6.0, 10.0])  # a tie with the floor (higher index) and a win
    sel.offer(2, g2, torch.ones(n))
    assert scored[-1] == [1, 31]
    got = sel.finish(4)
    assert {i: v[0].tolist() for i, v in got.items()} == {0: [3, 40, 41], 2: [500]}


def test_best_positions_breaks_ties_by_the_order_given():
    values = np.array([2.0, 5.0, 2.0, 2.0, -np.inf, 5.0], np.float32)
    assert leafwise._best_positions(values, None, 3).tolist() == [0, 1, 5]
    assert leafwise._best_positions(values, np.array([9, 0, 1, 0, 0, 7]), 3).tolist() == [1, 3, 5]
    assert leafwise._best_positions(values, None, 9).tolist() == [0, 1, 2, 3, 5]
    assert leafwise._best_positions(values, None, 0).tolist() == []
