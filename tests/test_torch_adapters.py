"""Summaries as adapters, torch side: folders, attach / detach in place, merging, the CLI on
torch folders, and one summary moved between a torch model and its Flax port."""

import copy
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import torch_bridge  # noqa: E402
from optax_selective.adapters import core  # noqa: E402
from optax_selective.adapters.cli import main as cli_main  # noqa: E402
from torch_bridge import adapters  # noqa: E402


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).to(dtype)


def trained(base, method="pafi", budget=12, steps=3, seed=1):
    model = copy.deepcopy(base)
    opt = torch_bridge.get_selective_optimizer(torch.optim.SGD, method)(
        model.parameters(), lr=0.5, budget=budget, max_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 6, generator=g).to(next(base.parameters()).dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
    return model, opt.get_summary(model)


def bits(model):
    return {k: v.detach().view(torch.uint8).clone() if v.dtype.is_floating_point else v.clone()
            for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["pafi", "id3"])
def test_attach_then_detach_is_bit_exact_after_training(dtype, method):
    base = mlp(dtype)
    tuned, summary = trained(base, method)
    assert summary["budget_used"] == 12
    before = bits(base)
    h = torch_bridge.attach(base, summary)
    assert same(bits(base), bits(tuned))
    assert h.nbytes == 12 * (8 + base[0].weight.element_size())  # int64 index + old value
    h.detach()
    assert same(bits(base), before)
    with pytest.raises(core.AdapterError, match="detached already"):
        h.detach()


def split(summary, parts=2):
    out = []
    for k in range(parts):
        s = copy.deepcopy(summary)
        for e in s["params"].values():
            e["indices"], e["values"] = e["indices"][k::parts], e["values"][k::parts]
        s["params"] = {n: e for n, e in s["params"].items() if e["indices"].numel()}
        s["budget_used"] = sum(e["indices"].numel() for e in s["params"].values())
        out.append(s)
    return out


@pytest.mark.parametrize("order", ["first-first", "last-first"])
def test_disjoint_attaches_detach_in_any_order_overlap_refused(order):
    base = mlp()
    tuned, summary = trained(base)
    a, b = split(summary)
    before = bits(base)
    ha = torch_bridge.attach(base, a, label="A")
    with pytest.raises(core.AdapterError, match="already changed by the attached summary A"):
        torch_bridge.attach(base, summary)
    hb = torch_bridge.attach(base, b, label="B")
    assert same(bits(base), bits(tuned))
    (ha if order == "first-first" else hb).detach()
    (hb if order == "first-first" else ha).detach()
    assert same(bits(base), before)
    torch_bridge.attach(base, summary).detach()  # free again once both are detached


def test_attach_refuses_another_model_naming_the_parameter():
    _, summary = trained(mlp())
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = bits(other)
    with pytest.raises(torch_bridge.SummaryMismatchError,
                       match=r"parameter '2.weight': shape \(3, 8\), the model's \(4, 8\)"):
        torch_bridge.attach(other, summary)
    assert same(bits(other), before)


def test_folder_round_trip_tamper_and_cli(tmp_path, capsys):
    base = mlp(torch.bfloat16)
    tuned, summary = trained(base)
    folder = torch_bridge.save_pretrained(summary, tmp_path / "a", base_model="org/mlp@r1",
                                          base=base, hyperparameters={"lr": 0.5}, budget=12)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "base.safetensors",
                                          "summary.safetensors"]
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert cfg["framework"] == "torch" and cfg["naming"] == "torch-named-parameters"
    assert cfg["base_model"] == {"id": "org/mlp", "revision": "r1"} and cfg["budget"] == 12
    assert [p["name"] for p in cfg["parameters"]] == list(summary["params"])
    read = torch_bridge.read_pretrained(folder, base)
    h = torch_bridge.attach(base, read.summary)
    assert same(bits(base), bits(tuned))
    h.detach()
    # tampered: the summary file swapped for another valid one
    _, other = trained(mlp(torch.bfloat16), seed=5)
    torch_bridge.write_summary_to_disk(os.path.join(folder, "summary.safetensors"), other)
    with pytest.raises(core.AdapterError, match="digest"):
        torch_bridge.load_pretrained(folder)
    # tampered: a byte of the file changed (the file's own digests catch it)
    good = torch_bridge.save_pretrained(summary, tmp_path / "b", base=base)
    raw = bytearray(open(os.path.join(good, "summary.safetensors"), "rb").read())
    raw[-1] ^= 1
    open(os.path.join(good, "summary.safetensors"), "wb").write(bytes(raw))
    with pytest.raises(torch_bridge.SummaryMismatchError):
        torch_bridge.load_pretrained(good)
    # a JAX loader refuses a torch folder, and the other way round
    import optax_selective as osel

    with pytest.raises(core.AdapterError, match="torch adapter"):
        osel.load_pretrained(folder)
    # the command line on a torch folder and a torch summary file
    ok = torch_bridge.save_pretrained(summary, tmp_path / "c", base=base)
    assert cli_main(["inspect", ok]) == 0
    text = capsys.readouterr().out
    assert "framework: torch" in text and "0.weight" in text and "bfloat16" in text
    torch_bridge.write_summary_to_disk(tmp_path / "s.safetensors", summary)
    assert cli_main(["inspect", str(tmp_path / "s.safetensors")]) == 0
    assert "torch summary file" in capsys.readouterr().out
    assert cli_main(["inspect", folder]) == 2
    assert "digest" in capsys.readouterr().err


def test_merge_matches_core_reference_and_cli(tmp_path, capsys):
    base = mlp()
    _, s1 = trained(base, "pafi", budget=10)
    _, s2 = trained(base, "id3", budget=10, seed=3)
    merged = torch_bridge.merge_summaries([s1, s2], [1.0, 0.5], rule="ties", base=base)
    # the torch merge is the shared core merge, on the same entries
    ref = core.merge_entries([adapters.to_entries(s, adapters.gather_base(base, s))
                              for s in (s1, s2)], [1.0, 0.5], rule="ties")
    got = adapters.to_entries(merged)
    assert [(e.name, e.indices.tolist(), e.values.tolist()) for e in got] == [
        (e.name, e.indices.tolist(), e.values.tolist()) for e in ref]
    # by hand for one shared entry
    names = {n for n in s1["params"] if n in s2["params"]}
    for name in names:
        i1 = s1["params"][name]["indices"].tolist()
        i2 = s2["params"][name]["indices"].tolist()
        shared = sorted(set(i1) & set(i2))
        for j in shared[:3]:
            b = base.state_dict()[name].reshape(-1)[j].item()
            d1 = s1["params"][name]["values"][i1.index(j)].item() - b
            d2 = 0.5 * (s2["params"][name]["values"][i2.index(j)].item() - b)
            s = np.sign(d1 + d2)
            kept = [d for d in (d1, d2) if np.sign(d) == s]
            want = np.float32(b + (sum(kept) / len(kept) if kept else 0.0))
            pos = got[[e.name for e in got].index(name)].indices.tolist().index(j)
            assert got[[e.name for e in got].index(name)].values[pos] == want
    a = torch_bridge.save_pretrained(s1, tmp_path / "a", base=base)
    b = torch_bridge.save_pretrained(s2, tmp_path / "b", base=base)
    assert cli_main(["merge", str(tmp_path / "m"), a, b, "--weights", "1,0.5", "--rule", "ties",
                     "--budget", "8"]) == 0
    capsys.readouterr()
    m = torch_bridge.load_pretrained(tmp_path / "m", base)
    want = torch_bridge.merge_summaries([s1, s2], [1.0, 0.5], rule="ties", budget=8, base=base)
    assert m["budget_used"] == 8
    for n, e in want["params"].items():
        assert torch.equal(m["params"][n]["indices"], e["indices"])
        assert torch.equal(m["params"][n]["values"], e["values"])
    with pytest.raises(core.AdapterError, match="no base values"):
        torch_bridge.merge_summaries([s1])
    other = mlp(seed=9)
    with pytest.raises(core.AdapterError, match="differ from base="):
        torch_bridge.merge_summaries([a], base=other)
    jax_like = tmp_path / "jx"
    import jax.numpy as jnp

    import optax_selective as osel

    p = {"w": jnp.zeros(3)}
    osel.save_pretrained(osel.make_summary(p, osel.selective_pafi(budget=1).init(p)), jax_like,
                         base=p)
    assert cli_main(["merge", str(tmp_path / "mx"), a, str(jax_like)]) == 2
    assert "mix frameworks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# one summary for both frameworks (a tiny torch model and its Flax NNX port)


def _tiny_pair():
    from flax import nnx

    torch_model = mlp()

    class Port(nnx.Module):
        def __init__(self):
            self.l0 = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
            self.l2 = nnx.Linear(8, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            import jax

            return self.l2(jax.nn.relu(self.l0(x)))

    port = Port()
    for src, dst in ((torch_model[0], port.l0), (torch_model[2], port.l2)):
        dst.kernel.set_value(src.weight.detach().numpy().T.copy())
        dst.bias.set_value(src.bias.detach().numpy().copy())

    def name_map(name):
        layer, kind = name.split(".")
        return (f"['l{layer}']['{'kernel' if kind == 'weight' else 'bias'}']", kind == "weight")

    return torch_model, port, name_map


def test_torch_summary_moves_to_flax_and_back_bit_for_bit():
    from flax import nnx

    import optax_selective as osel

    torch_model, port, name_map = _tiny_pair()
    tuned, summary = trained(torch_model, "id3", budget=15)
    jax_summary = adapters.to_jax(summary, name_map)
    state = nnx.state(port, nnx.Param)
    nnx.update(port, osel.apply_summary(state, jax_summary))
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    with torch.no_grad():
        want = tuned(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(port(x)), want, rtol=1e-5, atol=1e-6)
    # the values moved, not recomputed: kernel == weight.T bit for bit
    np.testing.assert_array_equal(np.asarray(port.l0.kernel.get_value()),
                                  tuned[0].weight.detach().numpy().T)
    back = adapters.from_jax(jax_summary, torch_model, name_map)
    for n, e in summary["params"].items():
        assert torch.equal(back["params"][n]["indices"], e["indices"]), n
        assert torch.equal(back["params"][n]["values"], e["values"]), n
