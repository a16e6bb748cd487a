"""Torch summaries: O(budget), BatchNorm statistics, weights-only loading, checked applying."""

import copy
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import (  # noqa: E402
    SummaryMismatchError,
    get_selective_optimizer,
    load_summary_from_disk,
    load_weights_from_summary,
    write_summary_to_disk,
)


def convnet(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3), torch.nn.BatchNorm1d(3),
    )


def trained(method="id3", budget=50):
    model = convnet()
    opt = get_selective_optimizer(torch.optim.Adam, method)(model.parameters(), lr=0.05,
                                                            budget=budget, max_steps=5)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 1, 6, 6, generator=g)).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("method", ["id3", "pafi", "bitfit"])
def test_roundtrip_into_fresh_model(tmp_path, method):
    model, opt = trained(method)
    summary = opt.get_summary(model)
    path = tmp_path / "s.pt"
    assert write_summary_to_disk(path, summary) is True
    loaded = load_summary_from_disk(path)
    assert loaded["budget_used"] == opt.get_budget_used() == sum(
        e["indices"].numel() for e in loaded["params"].values())
    assert all(e["indices"].dtype == torch.int32 for e in loaded["params"].values())
    assert loaded["method"] == method and "1.running_mean" in loaded["buffers"]
    fresh = convnet()
    load_weights_from_summary(fresh, loaded)
    for (n, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randn(2, 1, 6, 6)
    fresh.eval(), model.eval()
    assert torch.equal(fresh(x), model(x))


def test_size_is_order_budget(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 300)
    opt = get_selective_optimizer(torch.optim.SGD, "pafi")(model.parameters(), lr=0.1, budget=100)
    path = tmp_path / "s.pt"
    write_summary_to_disk(path, opt.get_summary(model))
    assert path.stat().st_size < 5_000  # the model itself is 361 kB


def expect_untouched(model, summary, match):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SummaryMismatchError, match=match):
        load_weights_from_summary(model, summary)
    for (n, a), b in zip(model.state_dict().items(), before.values()):
        assert torch.equal(a, b), n


def test_mismatch_raises_and_leaves_model_untouched():
    model, opt = trained()
    s = opt.get_summary(model)
    last = list(s["params"])[-1]
    fresh = convnet(seed=3)
    bad = copy.deepcopy(s)
    bad["params"][last]["indices"][-1] = 10**6
    expect_untouched(fresh, bad, "indices out of range")
    bad = copy.deepcopy(s)
    bad["params"]["9.weight"] = bad["params"].pop(last)
    expect_untouched(fresh, bad, "summary has parameter '9.weight'")
    bad = copy.deepcopy(s)
    bad["params"][last]["values"] = bad["params"][last]["values"].double()
    expect_untouched(fresh, bad, "values dtype")
    bad = copy.deepcopy(s)
    bad["buffers"]["1.running_var"] = torch.ones(7)
    expect_untouched(fresh, bad, "buffer 1.running_var")
    other = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5), torch.nn.BatchNorm1d(5))
    expect_untouched(other, s, "shape")
    expect_untouched(fresh, {"values": []}, "not an optax_selective torch summary")


def test_loading_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "optax_selective.torch_summary", "x": Evil()}, path)
    with pytest.raises(SummaryMismatchError, match="not a weights-only summary"):
        load_summary_from_disk(path)
    assert not marker.exists()


def test_summary_needs_the_trained_model():
    model, opt = trained()
    with pytest.raises(ValueError, match="not a parameter of the model passed to get_summary"):
        opt.get_summary(torch.nn.Linear(2, 2))


# -- the base the summary was made against -----------------------------------------------------
def test_a_summary_onto_other_base_weights_is_refused_unless_forced(tmp_path):
    model, opt = trained()
    write_summary_to_disk(tmp_path / "s.safetensors", opt.get_summary(model))
    summary = load_summary_from_disk(tmp_path / "s.safetensors")
    assert summary["base_fingerprint"]["params"].keys() == dict(model.named_parameters()).keys()
    same = convnet()  # the weights it was trained from
    load_weights_from_summary(same, summary)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), model.parameters()))
    other = convnet(seed=5)  # same architecture, other weights
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(SummaryMismatchError, match=r"other base weights: 0\.weight .*force=True"):
        load_weights_from_summary(other, summary)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), before))  # untouched
    with torch.no_grad():  # one unselected entry of a parameter the summary does not touch
        changed = convnet()
        untouched = [n for n in dict(changed.named_parameters()) if n not in summary["params"]]
        dict(changed.named_parameters())[untouched[0] if untouched else "4.bias"].view(-1)[0] += 1
    with pytest.raises(SummaryMismatchError, match="other base weights"):
        load_weights_from_summary(changed, summary)
    load_weights_from_summary(other, summary, force=True)  # the user's call
    for name, e in summary["params"].items():
        got = dict(other.named_parameters())[name].detach().reshape(-1)[e["indices"].long()]
        assert torch.equal(got, e["values"])


def test_summaries_without_a_fingerprint_load_onto_any_base(tmp_path):
    model, opt = trained()
    summary = opt.get_summary(model)
    del summary["base_fingerprint"]  # as 0.4 files and earlier versions of this library
    write_summary_to_disk(tmp_path / "s.safetensors", summary)
    loaded = load_summary_from_disk(tmp_path / "s.safetensors")
    assert "base_fingerprint" not in loaded
    load_weights_from_summary(convnet(seed=5), loaded)
