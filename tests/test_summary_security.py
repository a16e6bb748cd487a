"""Attacks on JAX summary folders (issue 13): forged array metadata, metadata edits the digest
must catch, in-place edits of loaded leaves, symbolic links, foreign folders."""

import json
import os
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import optax_selective as osel  # noqa: E402
from optax_selective.summary import _format  # noqa: E402


def a_summary():
    w = osel.SummaryLeaf("['w']", (3, 4), np.float32, np.array([1, 5, 11], np.int32),
                         np.array([1.0, 2.0, 3.0], np.float32))
    b = osel.SummaryLeaf("['b']", (3,), np.float32, np.array([0, 2], np.int32),
                         np.array([4.0, 5.0], np.float32))
    return osel.SparseSummary((w, b), 5, "pafi")


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "summary"
    osel.save_summary(path, a_summary())
    return path


def edit_json(file, edit):
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def refused(path, match):
    with pytest.raises(osel.SummaryFormatError, match=match) as info:
        osel.load_summary(path)
    assert str(path) in str(info.value)
    return info.value


# --- forged array metadata: refused before anything is read --------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("shape", [10**7], "its stored array has shape"),
    ("shape", [250_000_000], "its stored array has shape"),
    ("chunks", [10**6], "stored in chunks"),
    ("chunks", [0], "stored in chunks"),
    ("dtype", "<f8", "stored dtype"),
])
def test_forged_zarray_is_refused_before_reading(saved, field, value, match):
    for part in ("values", "indices"):
        edit_json(saved / "arrays" / f"leaf_0000.{part}" / ".zarray",
                  lambda z: z.__setitem__(field, value))
    if field == "shape":  # with the chunks forged too, the old reader aborted the interpreter
        edit_json(saved / "arrays" / "leaf_0000.values" / ".zarray",
                  lambda z: z.__setitem__("chunks", value))
    start = time.perf_counter()
    refused(saved, match)
    # bounded work: nothing near 10**7 entries was read (the old reader took about a minute)
    assert time.perf_counter() - start < 5


def test_count_beyond_the_leaf_is_refused(saved):
    def grow(meta):
        meta["leaves"][0]["count"] = 10**12
    edit_json(saved / "metadata" / "metadata", grow)
    refused(saved, "does not fit shape")


# --- the digest covers key, shape and dtype --------------------------------------------------


@pytest.mark.parametrize("edit", [
    lambda leaf: leaf.__setitem__("key", "['v']"),
    lambda leaf: leaf.__setitem__("shape", [4, 3]),
    lambda leaf: leaf.__setitem__("shape", [2, 6]),
])
def test_metadata_edits_break_the_digest(saved, edit):
    edit_json(saved / "metadata" / "metadata", lambda m: edit(m["leaves"][0]))
    refused(saved, "does not match the recorded SHA-256")


def test_version_1_folders_still_load(saved):
    s = a_summary()

    def to_v1(meta):
        meta["format_version"] = 1
        for m, leaf in zip(meta["leaves"], s.leaves):
            m["sha256"] = _format.digest_v1(leaf)
    edit_json(saved / "metadata" / "metadata", to_v1)
    assert osel.load_summary(saved).budget_used == 5


# --- leaves cannot be changed after validation ----------------------------------------------


def test_loaded_leaves_are_read_only(saved):
    leaf = osel.load_summary(saved).leaves[0]
    with pytest.raises(ValueError, match="read-only"):
        leaf.indices[0] = -1
    with pytest.raises(ValueError, match="read-only"):
        leaf.values[0] = np.nan


def test_leaves_own_their_arrays():
    idx, vals = np.array([0, 2], np.int32), np.array([1.0, 2.0], np.float32)
    leaf = osel.SummaryLeaf("['w']", (3,), np.float32, idx, vals)
    idx[1] = -1  # the caller's array; the leaf kept its own checked copy
    assert leaf.indices.tolist() == [0, 2] and not leaf.indices.flags.writeable
    out = osel.apply_summary({"w": np.zeros(3, np.float32)}, osel.SparseSummary((leaf,), 2, "x"))
    assert out["w"].tolist() == [1.0, 0.0, 2.0]


# --- symbolic links and foreign folders ------------------------------------------------------


def test_symlinks_out_of_the_folder_are_refused(saved, tmp_path):
    chunk = saved / "arrays" / "leaf_0000.values" / "0"
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(chunk, outside)
    chunk.unlink()
    chunk.symlink_to(outside)
    refused(saved, "symbolic link out of the summary folder|not a regular file inside")


def test_symlinked_metadata_is_refused(saved, tmp_path):
    meta = saved / "metadata" / "metadata"
    outside = tmp_path / "meta.json"
    shutil.copy(meta, outside)
    meta.unlink()
    meta.symlink_to(outside)
    refused(saved, "not a regular file inside the summary folder")


def foreign_folder(tmp_path):
    folder = tmp_path / "my_experiments"
    folder.mkdir()
    for name in ("secret_plan.txt", "private_key.pem"):
        (folder / name).write_text("do not touch")
    (folder / "metadata").mkdir()
    (folder / "metadata" / "notes_confidential").write_text("x")
    return folder


def test_errors_do_not_list_foreign_folders(tmp_path):
    plain = tmp_path / "project"
    (plain / "secret_project").mkdir(parents=True)  # orbax's own error listed sub-folders
    (plain / "secret_plan.txt").write_text("x")
    for folder in (plain, foreign_folder(tmp_path)):
        err = refused(folder, "could not read its metadata")
        for name in ("secret_plan", "private_key", "notes_confidential", "secret_project"):
            assert name not in str(err)


def test_overwrite_never_replaces_what_is_not_a_summary(tmp_path):
    folder = foreign_folder(tmp_path)
    with pytest.raises(FileExistsError, match="not an optax_selective summary") as info:
        osel.save_summary(folder, a_summary(), overwrite=True)
    assert "secret_plan" not in str(info.value)
    assert sorted(os.listdir(folder)) == ["metadata", "private_key.pem", "secret_plan.txt"]
    file = tmp_path / "a_file"
    file.write_text("keep me")
    with pytest.raises(FileExistsError, match="not an optax_selective summary"):
        osel.save_summary(file, a_summary(), overwrite=True)
    assert file.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "my_experiments"]  # no temporaries left


def test_overwrite_replaces_a_summary(saved):
    other = osel.SparseSummary(a_summary().leaves[:1], 3, "id3")
    osel.save_summary(saved, other, overwrite=True)
    assert osel.load_summary(saved).method == "id3"
    assert os.listdir(saved.parent) == ["summary"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_folders_only_raise_summary_format_error(saved, tmp_path):
    """Random byte flips and truncations of any file: each load returns the summary or raises
    SummaryFormatError naming the folder."""
    files = sorted(p for p in saved.rglob("*") if p.is_file())
    rng = np.random.default_rng(0)
    for trial in range(60):
        f = files[int(rng.integers(0, len(files)))]
        original = f.read_bytes()
        bad = bytearray(original)
        if trial % 3 == 0 or not bad:
            bad = bad[: int(rng.integers(0, len(bad) + 1))]
        else:
            bad[int(rng.integers(0, len(bad)))] = int(rng.integers(0, 256))
        f.write_bytes(bytes(bad))
        try:
            osel.load_summary(saved)
        except osel.SummaryFormatError as e:
            assert str(saved) in str(e)
        finally:
            f.write_bytes(original)


def test_overwrite_without_the_atomic_swap_still_replaces(saved, monkeypatch):
    """Where renameat2 is unavailable (not Linux), the old folder is renamed aside first."""
    from optax_selective.summary import atomic as _atomic

    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    other = osel.SparseSummary(a_summary().leaves[1:], 2, "bitfit")
    osel.save_summary(saved, other, overwrite=True)
    assert osel.load_summary(saved).method == "bitfit"
    assert os.listdir(saved.parent) == ["summary"]
