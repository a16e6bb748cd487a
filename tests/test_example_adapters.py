"""The adapter examples and the swap benchmark, with tiny settings (offline MiniLM)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.mark.side
@pytest.mark.slow
def test_torch_summary_on_the_flax_port_and_back(tmp_path):
    from examples.minilm_adapters import NAMING, main

    r = main(["--steps", "2", "--n-eval", "4", "--folder", str(tmp_path)])
    assert r["max_abs_logit_diff"] <= 1e-4 and r["same_predictions"]
    assert r["round_trip_bit_exact"] and r["budget_used"] > 0
    import optax_selective as osel

    assert osel.read_pretrained(r["folders"][1]).config["naming"] == NAMING
    with pytest.raises(SystemExit):  # the check can fail: no tolerance for float differences
        main(["--steps", "1", "--n-eval", "2", "--tol", "0"])


@pytest.mark.side
@pytest.mark.slow
def test_serving_three_adapters_keeps_the_base(tmp_path, capsys):
    from examples.serve_adapters import main

    r = main(["--steps", "1", "--requests", "6", "--folder", str(tmp_path)])
    assert r["base_unchanged"] and set(r["entries"]) == {"id3", "pafi", "bitfit"}
    assert [a[0] for a in r["answers"]] == ["id3", "pafi", "bitfit"] * 2
    assert "base bit-for-bit unchanged: True" in capsys.readouterr().out


@pytest.mark.side
@pytest.mark.slow
def test_merge_example_evaluates_each_model_on_both_tasks(tmp_path):
    from examples.merge_adapters import TASKS, main

    out = tmp_path / "merge"
    r = main(["--steps", "2", "--n-train", "64", "--n-eval", "8", "--merge-budget",
              "--out", str(out)])
    names = [row["model"] for row in r["rows"]]
    assert names[:3] == ["base", f"{TASKS[0]} only", f"{TASKS[1]} only"]
    assert {"merge sum", "merge mean", "merge ties"} <= set(names)
    single = r["rows"][1]["entries"]
    assert r["rows"][-1]["entries"] == r["budget"] == single
    assert all(r["rows"][3 + k]["entries"] >= single for k in range(3))
    assert "| merge ties |" in (tmp_path / "merge.md").read_text()


@pytest.mark.side
@pytest.mark.slow
def test_swap_benchmark_on_the_tiny_llama(tmp_path):
    from benchmarks.adapter_swap import main

    r = main(["--size", "tiny", "--steps", "2", "--repeat", "1", "--out", str(tmp_path / "s")])
    rows = {row["case"]: row for row in r["rows"]}
    assert rows["summary attach + detach"]["restores_bits"]
    assert rows["summary attach + detach"]["kept_bytes"] < rows[
        "load_state_dict (in memory)"]["kept_bytes"]
    assert "peft LoRA merge_adapter + unmerge_adapter" in rows
    assert "Target swap <= 1% of a training step" in (tmp_path / "s.md").read_text()
