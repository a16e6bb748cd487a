"""Attacks on torch summary files (issue 13): each test builds the malicious or damaged file
itself, inside tmp_path, and checks it is refused with a SummaryMismatchError naming the file,
that nothing in it ran, and that the model was not touched."""

import copy
import json
import os
import struct
import zipfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import selective_optimizers.load_store as sol  # noqa: E402
from torch_bridge import (  # noqa: E402
    SummaryMismatchError,
    UnsafeFileError,
    load_summary_from_disk,
    load_weights_from_summary,
    make_summary,
    read_legacy_summary,
    write_summary_to_disk,
)
from torch_bridge.summary import _digest, _param_head  # noqa: E402


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def a_summary(model):
    w, b = model[0].weight, model[0].bias
    masks = [torch.tensor([[True, False, True], [False, False, True]]), torch.tensor([False, True]),
             torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)]
    return make_summary(model, [w, b, model[1].weight, model[1].bias], masks, method="pafi")


def refused(path, match, reader=load_summary_from_disk):
    with pytest.raises(SummaryMismatchError, match=match) as info:
        reader(path)
    assert str(path) in str(info.value)
    return info.value


# ------------------------------------------------------------------------------------------
# code execution through torch files


class Evil(torch.nn.Module):
    """A TorchScript module whose __setstate__ writes a file when the archive is loaded."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        t = torch.from_file(self.path, shared=True, size=6, dtype=torch.uint8)
        t.fill_(33)
        print(t)  # keeps the write alive in the TorchScript graph


def test_torchscript_archive_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "written_by_archive"
    path = tmp_path / "summary_04.pt"
    torch.jit.save(torch.jit.script(Evil(str(marker))), str(path))
    refused(path, "TorchScript archive", read_legacy_summary)
    refused(path, "TorchScript archive")
    assert not marker.exists()
    # the archive is live: torch's own loader runs its __setstate__ and writes the file
    torch.jit.load(str(path))
    assert marker.read_bytes() == b"!" * 6


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Runs:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "s.pt"
    torch.save({"format": "optax_selective.torch_summary", "x": Runs()}, path)
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        load_summary_from_disk(path)
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        read_legacy_summary(path)
    assert not marker.exists()


def test_non_plain_zips_are_refused(tmp_path):
    src = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(4)}, src)
    with zipfile.ZipFile(src) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    extra = tmp_path / "extra.pt"  # an entry torch.save never writes
    with zipfile.ZipFile(extra, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
        z.writestr(entries[0][0].split("/")[0] + "/extra/run.py", b"print(1)")
    refused(extra, "not a plain torch.save archive")
    bomb = tmp_path / "deflated.pt"  # a small file that inflates to many MiB
    with zipfile.ZipFile(bomb, "w") as z:
        for name, data in entries:
            if name.endswith("data/0"):
                z.writestr(name, b"\0" * (32 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                z.writestr(name, data)
    assert bomb.stat().st_size < 2**20
    refused(bomb, "compressed")
    old = tmp_path / "old_format.pt"
    torch.save({"a": torch.zeros(2)}, old, _use_new_zipfile_serialization=False)
    refused(old, "neither a safetensors summary nor a torch.save zip")


def test_stride_zero_tensors_are_refused(tmp_path):
    # A 1 KB file whose indices tensor claims 10**6 duplicate entries through stride 0.
    model = small_model()
    s = dict(a_summary(model))
    n = 10**6
    s["params"] = {"0.weight": {"position": 0, "shape": [2, 3], "dtype": "float32",
                                "indices": torch.zeros(1, dtype=torch.int32).expand(n),
                                "values": torch.zeros(1).expand(n)}}
    s["budget_used"] = n
    path = tmp_path / "stride0.pt"
    torch.save(s, path)
    assert path.stat().st_size < 4096
    refused(path, "stride")


def test_old_torch_save_summaries_still_load(tmp_path):
    model = small_model()
    s = a_summary(model)
    path = tmp_path / "v1.pt"
    old = {k: v for k, v in s.items() if k != "base_fingerprint"}  # they recorded no base
    torch.save(old, path)  # what earlier versions of write_summary_to_disk wrote
    loaded = load_summary_from_disk(path)
    assert loaded["budget_used"] == 4 and loaded.budget_used == 4
    fresh = small_model(1)
    load_weights_from_summary(fresh, loaded)
    assert torch.equal(fresh[0].weight.view(-1)[[0, 2, 5]], model[0].weight.view(-1)[[0, 2, 5]])


# ------------------------------------------------------------------------------------------
# 0.4 summaries: built here with a stand-in for 0.4's record class


class SelectivePeftSummary:
    pass


SelectivePeftSummary.__module__ = "selective_optimizers.load_store"


def write_04(monkeypatch, path, values, pointers, shapes, bn, budget_used):
    monkeypatch.setattr(sol, "SelectivePeftSummary", SelectivePeftSummary, raising=False)
    rec = SelectivePeftSummary()
    rec.__dict__.update(values=values, pointers=pointers, shapes=shapes, bn_metadata=bn,
                        budget_used=budget_used)
    torch.save(rec, path)


def bn_04(model):
    m = model[1]
    return [{"running_mean": m.running_mean.clone(), "running_var": m.running_var.clone(),
             "num_batches_tracked": m.num_batches_tracked.clone()}]


def test_valid_0_4_file_loads_with_its_attributes(tmp_path, monkeypatch):
    model = small_model()
    mask = torch.tensor([[True, False, True], [False, False, True]])
    path = tmp_path / "ok.pt"
    write_04(monkeypatch, path, [model[0].weight.data[mask], None, None, None],
             [mask.nonzero(), None, None, None], [model[0].weight.shape, None, None, None],
             bn_04(model), 3)
    s = load_summary_from_disk(path)
    assert s.budget_used == 3 and s.pointers[0].tolist() == [[0, 0], [0, 2], [1, 2]]
    assert s.shapes[0] == torch.Size([2, 3]) and s.values[1] is None
    assert set(s.bn_metadata[0]) == {"running_mean", "running_var", "num_batches_tracked"}
    fresh = small_model(1)
    load_weights_from_summary(fresh, s)
    assert torch.equal(fresh[0].weight[mask], model[0].weight[mask])


@pytest.mark.parametrize(
    "pointers, values, budget, match",
    [
        ([[0, 5]], [1.0], 1, "outside the shape"),          # flat index 5 in a (2, 3) weight
        ([[1, -1]], [1.0], 1, "outside the shape"),         # flat index 2
        ([[2, 0]], [1.0], 1, "outside the shape"),
        ([[0, 1], [0, 1]], [1.0, 2.0], 2, "repeat"),         # duplicates
        ([[1, 0], [0, 1]], [1.0, 2.0], 2, "order"),
        ([[0, 1]], [float("nan")], 1, "finite"),
        ([[0, 1]], [1.0], 10**9, "budget_used"),
        ("column", [1.0, 2.0], 2, r"int64 \(2, 2\)"),       # a (2, 1) pointer tensor
    ],
)
def test_forged_0_4_pointers_are_refused(tmp_path, monkeypatch, pointers, values, budget, match):
    model = small_model()
    ptr = torch.tensor([[0], [1]]) if pointers == "column" else torch.tensor(pointers)
    path = tmp_path / "forged.pt"
    write_04(monkeypatch, path, [torch.tensor(values), None, None, None], [ptr, None, None, None],
             [torch.Size([2, 3]), None, None, None], bn_04(model), budget)
    before = copy.deepcopy(model.state_dict())
    refused(path, match, read_legacy_summary)
    refused(path, match)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


# ------------------------------------------------------------------------------------------
# the safetensors format


def written(tmp_path):
    model = small_model()
    path = tmp_path / "summary.pt"
    assert write_summary_to_disk(path, a_summary(model)) is True
    return model, path


def forge(path, tensors_fn=None, meta_fn=None, *, redigest=True):
    """Rewrites a summary file with changed tensors/metadata (recomputing the digests, as an
    attacker can)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["optax_selective"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    if redigest:
        for e in meta["params"]:
            pre = f"params/{e['name']}/"
            entry = {**e, "indices": tensors[pre + "indices"], "values": tensors[pre + "values"]}
            e["count"] = int(entry["indices"].numel())
            e["sha256"] = _digest(_param_head(e["name"], entry), entry["indices"],
                                  entry["values"])
    path.write_bytes(safetensors.torch.save(
        tensors, metadata={"format": "optax_selective.torch_summary",
                           "optax_selective": json.dumps(meta)}))


def test_is_a_safetensors_file_without_pickle(tmp_path):
    _, path = written(tmp_path)
    data = path.read_bytes()
    assert not data.startswith(b"PK")  # no zip, no pickle
    n = struct.unpack("<Q", data[:8])[0]
    assert json.loads(data[8:8 + n])["__metadata__"]["format"] == "optax_selective.torch_summary"


def test_flipped_value_byte_is_detected(tmp_path):
    model, path = written(tmp_path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01  # inside the tensor bytes
    path.write_bytes(bytes(data))
    refused(path, "SHA-256")


def test_metadata_changes_are_detected(tmp_path):
    _, path = written(tmp_path)

    def move(meta):
        meta["params"][0]["position"] = 1
    forge(path, meta_fn=move, redigest=False)
    refused(path, "SHA-256")


@pytest.mark.parametrize("attack, match", [
    ("duplicates", "not strictly increasing"),
    ("unsorted", "not strictly increasing"),
    ("out_of_range", "out of range"),
    ("nan", "NaN"),
    ("budget", "budget_used"),
    ("shape_lie", "stored as"),
    ("extra_tensor", "do not match its metadata"),
])
def test_forged_but_consistent_files_are_refused(tmp_path, attack, match):
    _, path = written(tmp_path)
    w = "params/0.weight/"

    def tensors_fn(t):
        if attack == "duplicates":
            t[w + "indices"] = torch.tensor([0, 0, 5], dtype=torch.int32)
        elif attack == "unsorted":
            t[w + "indices"] = torch.tensor([5, 0, 2], dtype=torch.int32)
        elif attack == "out_of_range":
            t[w + "indices"] = torch.tensor([0, 2, 6], dtype=torch.int32)
        elif attack == "nan":
            t[w + "values"] = torch.tensor([0.0, float("nan"), 1.0])
        elif attack == "extra_tensor":
            t["params/other/values"] = torch.zeros(3)

    def meta_fn(m):
        if attack == "budget":
            m["budget_used"] = 10**9
        elif attack == "shape_lie":
            m["params"][0]["count"] = 10**7

    forge(path, tensors_fn, meta_fn, redigest=attack != "shape_lie")
    if attack == "shape_lie":  # the digest would not match either, but the size check is first
        forge(path, meta_fn=meta_fn, redigest=False)
    refused(path, match)


def test_huge_header_claim_is_refused(tmp_path):
    _, path = written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    refused(path, "claim a header of 1099511627776 bytes")


def test_forged_tensor_offsets_are_refused(tmp_path):
    _, path = written(tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = "params/0.weight/values"
    header[key]["data_offsets"][1] += 10**8  # claims 100 MB the file does not have
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    refused(path, "malformed|stored as|data_offsets")


def test_not_a_summary_names_the_file(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(64))
    refused(path, "not a valid summary file")
    path = tmp_path / "adapter.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    refused(path, "no optax_selective entry")


def test_refused_summaries_leave_the_model_untouched():
    model = small_model()
    s = a_summary(model)
    s["params"]["0.weight"]["indices"] = torch.tensor([0, 0, 5], dtype=torch.int32)
    s["params"]["0.weight"]["values"] = torch.tensor([7.0, 8.0, 9.0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SummaryMismatchError, match="not strictly increasing"):
        load_weights_from_summary(model, s)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    with pytest.raises(SummaryMismatchError, match="not strictly increasing"):
        write_summary_to_disk(os.devnull + "_never", s)


def test_summary_keeps_0_4_attributes():
    model = small_model()
    s = a_summary(model)
    assert s.budget_used == 4
    assert len(s.values) == len(s.pointers) == len(s.shapes) == 4
    assert s.pointers[0].tolist() == [[0, 0], [0, 2], [1, 2]]
    assert s.pointers[1].tolist() == [[1]] and s.values[2] is None
    assert s.shapes[0] == torch.Size([2, 3])
    assert set(s.bn_metadata[0]) == {"running_mean", "running_var", "num_batches_tracked"}
    assert torch.equal(s.values[0], model[0].weight.detach()[s.pointers[0][:, 0],
                                                             s.pointers[0][:, 1]])


def test_torch_save_of_a_summary_stays_weights_only_loadable(tmp_path):
    model = small_model()
    s = a_summary(model)
    path = tmp_path / "by_hand.pt"
    torch.save(s, path)  # users who saved summaries themselves, as in 0.4
    plain = torch.load(path, weights_only=True)
    assert plain["budget_used"] == 4
    assert load_summary_from_disk(path).pointers[0].tolist() == [[0, 0], [0, 2], [1, 2]]
    assert copy.deepcopy(s).budget_used == 4


def test_0_4_values_of_another_dtype_are_refused_with_the_cast_to_use(tmp_path, monkeypatch):
    model = small_model()
    mask = torch.tensor([[True, False, True], [False, False, True]])
    path = tmp_path / "fp32.pt"
    write_04(monkeypatch, path, [model[0].weight.data[mask], None, None, None],
             [mask.nonzero(), None, None, None], [model[0].weight.shape, None, None, None],
             bn_04(model), 3)
    s = load_summary_from_disk(path)
    half = small_model(1)
    half[0].to(torch.float64)
    with pytest.raises(SummaryMismatchError, match="values are torch.float32, the model's "
                                                   "parameter is torch.float64"):
        load_weights_from_summary(half, s)
    s["values"] = [None if v is None else v.to(p.dtype) for v, p in zip(s["values"],
                                                                        half.parameters())]
    load_weights_from_summary(half, s)
    assert torch.equal(half[0].weight[mask], model[0].weight[mask].double())


@pytest.mark.parametrize("kind", ["safetensors", "torch.save", "0.4"])
def test_damaged_files_only_raise_summary_mismatch(tmp_path, monkeypatch, kind):
    """Random byte flips and truncations: each load either returns a valid summary or raises
    SummaryMismatchError naming the file (never AttributeError, KeyError, EOFError, ...)."""
    model = small_model()
    src = tmp_path / "src.pt"
    if kind == "safetensors":
        write_summary_to_disk(src, a_summary(model))
    elif kind == "torch.save":
        torch.save(dict(a_summary(model)), src)
    else:
        mask = torch.tensor([[True, False, True], [False, False, True]])
        write_04(monkeypatch, src, [model[0].weight.data[mask], None, None, None],
                 [mask.nonzero(), None, None, None], [model[0].weight.shape, None, None, None],
                 bn_04(model), 3)
    data = src.read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "damaged.pt"
    for trial in range(200):
        bad = bytearray(data)
        if trial % 4 == 0:
            bad = bad[: int(rng.integers(0, len(bad)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                bad[int(rng.integers(0, len(bad)))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(bad))
        try:
            load_summary_from_disk(path)
        except SummaryMismatchError as e:
            assert str(path) in str(e)


# ------------------------------------------------------------------------------------------
# issue 28: BatchNorm statistics, error types, inconsistencies, caps


def forge_buffers(path, change):
    """Rewrites the file with changed BatchNorm buffers, digests recomputed (as an attacker
    can)."""
    from torch_bridge.summary import _buffer_head

    def tensors_fn(tensors):
        for k in list(tensors):
            if k.startswith("buffers/"):
                tensors[k] = change(k.removeprefix("buffers/"), tensors[k])
        forged.update(tensors)

    def meta_fn(meta):
        for e in meta["buffers"]:
            t = forged[f"buffers/{e['name']}"]
            e["sha256"] = _digest(_buffer_head(e["name"], t), t)

    forged = {}
    forge(path, tensors_fn, meta_fn)


@pytest.mark.parametrize("stat, value, match", [
    ("running_var", -1.0, "negative"), ("running_var", float("nan"), "NaN or infinity"),
    ("running_mean", float("inf"), "NaN or infinity"), ("num_batches_tracked", -5, "negative"),
])
def test_bad_batchnorm_statistics_are_refused(tmp_path, monkeypatch, stat, value, match):
    model, path = written(tmp_path)

    def change(name, t):
        return torch.full_like(t, value) if name.endswith(stat) else t

    forge_buffers(path, change)
    refused(path, match)
    bn = bn_04(model)
    bn[0][stat] = torch.full_like(bn[0][stat], value)
    legacy = tmp_path / "bn_04.pt"
    write_04(monkeypatch, legacy, [None] * 4, [None] * 4, [None] * 4, bn, 0)
    refused(legacy, match, read_legacy_summary)
    refused(legacy, match)


def test_huge_0_4_shapes_raise_the_library_error(tmp_path, monkeypatch):
    model = small_model()
    path = tmp_path / "huge.pt"
    write_04(monkeypatch, path, [torch.tensor([1.0]), None, None, None],
             [torch.tensor([[0, 0, 0]]), None, None, None], [[2**40] * 3, None, None, None],
             bn_04(model), 1)
    refused(path, "more than int64 indices reach", read_legacy_summary)


def test_huge_declared_shape_is_refused_before_pointers_are_computed(tmp_path):
    _, path = written(tmp_path)

    def meta_fn(meta):
        meta["params"][0]["shape"] = [2**40] * 3
    forge(path, meta_fn=meta_fn)
    refused(path, "fewer than 2..63 entries")


def test_a_header_over_the_cap_says_so(tmp_path):
    _, path = written(tmp_path)
    data = path.read_bytes()
    n = 17 * 2**20
    path.write_bytes(struct.pack("<Q", n) + data[8:] + b" " * n)
    refused(path, "more than the 16 MiB a summary of at most 16384 parameters may have")


def test_an_entry_listed_twice_is_refused(tmp_path):
    _, path = written(tmp_path)
    forge(path, meta_fn=lambda meta: meta["params"].append(dict(meta["params"][0])))
    refused(path, "listed twice")


def test_num_params_of_another_model_is_refused(tmp_path):
    model, path = written(tmp_path)
    forge(path, meta_fn=lambda meta: meta.update(num_params=1000))
    s = load_summary_from_disk(path)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SummaryMismatchError, match="a model of 1000 parameters, this model has 4"):
        load_weights_from_summary(model, s)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


@pytest.mark.parametrize("method", ["x" * 100_000, "id3\n", "", "\x00pafi"])
def test_malformed_method_names_are_refused(tmp_path, method):
    _, path = written(tmp_path)
    forge(path, meta_fn=lambda meta: meta.update(method=method))
    refused(path, "is not a method name")


def test_entries_the_model_lacks_are_refused_before_reading(tmp_path):
    model, path = written(tmp_path)
    assert load_summary_from_disk(path, model=model).budget_used == 4
    def rename(tensors):
        for kind in ("indices", "values"):
            tensors[f"params/no.such/{kind}"] = tensors.pop(f"params/0.weight/{kind}")

    forge(path, rename, lambda meta: meta["params"][0].update(name="no.such"))
    with pytest.raises(SummaryMismatchError, match="the model has none such"):
        load_summary_from_disk(path, model=model)


def test_more_params_than_the_cap_are_refused(tmp_path):
    model, path = written(tmp_path)
    n = load_summary_from_disk(path).budget_used
    assert n == 4 and len(load_summary_from_disk(path)["params"]) == 2
    refused_cap = pytest.raises(SummaryMismatchError, match="lists 2 parameters, more than")
    with refused_cap:
        load_summary_from_disk(path, max_params=1)
    with refused_cap:
        load_summary_from_disk(path, model=torch.nn.Linear(1, 1, bias=False))


def test_many_empty_entries_under_the_cap_load(tmp_path):
    """The shape of the slow file of issue 28 (zero-count entries), smaller: it loads, with
    every entry checked (the speed is measured by benchmarks/summary_load.py)."""
    from torch_bridge.summary import MAX_PARAMS, Summary

    n = 2_000
    params = {f"p{i}": {"position": i, "shape": [3], "dtype": "float32",
                        "indices": torch.zeros(0, dtype=torch.int32), "values": torch.zeros(0)}
              for i in range(n)}
    s = Summary(format="optax_selective.torch_summary", format_version=1, method="pafi",
                budget_used=0, num_params=n, params=params, buffers={})
    path = tmp_path / "empty.safetensors"
    write_summary_to_disk(path, s)
    assert len(load_summary_from_disk(path)["params"]) == n
    assert MAX_PARAMS >= 16_384


def test_the_digest_head_is_json_dumps():
    from torch_bridge.summary import _head_json

    for name in ["w", 'we"ird\\name', "ünï.cödé", "a\nb"]:
        for head in ({"name": name, "position": 3, "shape": [2, 0, 5], "dtype": "bfloat16",
                      "index_dtype": "int64", "count": 7},
                     {"name": name, "shape": [], "dtype": "int64"}):
            assert _head_json(head) == json.dumps(head, sort_keys=True)


def test_pointers_of_a_huge_declared_shape_raise_the_library_error():
    from torch_bridge.summary import Summary

    s = Summary(format="optax_selective.torch_summary", format_version=1, method="pafi",
                budget_used=1, num_params=1, buffers={},
                params={"w": {"position": 0, "shape": [2**40] * 3, "dtype": "float32",
                              "indices": torch.tensor([0]), "values": torch.tensor([1.0])}})
    with pytest.raises(SummaryMismatchError, match="more than int64 indices reach"):
        _ = s.pointers
