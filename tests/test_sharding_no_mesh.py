"""Sharded params and a step jitted without ``jax.set_mesh`` (issue 12), on 8 simulated CPU
devices: ID3 selects on the shards (the compiled step moves no leaf-sized array, read from
its HLO), every output keeps its input's sharding, and results equal the single-device run.

The checks are ``tests/_dist_workers/no_mesh_worker.py``'s; they run in the 8-device child
pytest (marker ``eight_devices``, ``tests/conftest.py``): the device count is fixed when jax
is first imported.
"""

import functools

import pytest

WIDTH = 2048  # tests/_dist_workers/common.py: every sharded leaf holds >= WIDTH entries
BUDGET = 300
pytestmark = [pytest.mark.eight_devices, pytest.mark.slow]


@functools.cache
def rows():
    """One row per form (the worker's, run once): its sharded run against the single-device one."""
    from tests._dist_workers import no_mesh_worker

    return {r["form"]: r for r in no_mesh_worker.rows()}


FORMS = ["id3_compact", "id3_dense", "id3_chain"]


@pytest.mark.parametrize("form", FORMS)
def test_no_collective_moves_a_whole_leaf(form):
    row = rows()[form]
    # compact state exchanges O(budget) slot values and new indices; the others only scalars
    limit = 2 * BUDGET if form == "id3_compact" else 1
    assert row["largest_collective"] <= limit < WIDTH, row["collectives"]


@pytest.mark.parametrize("form", FORMS)
def test_every_output_keeps_its_input_sharding(form):
    assert rows()[form]["sharding_changed"] == []


@pytest.mark.parametrize("form", FORMS)
def test_results_equal_the_single_device_run(form):
    assert rows()[form]["same_as_single_device"]
