"""Selective LoRA: ID3 (or PaFI, BitFit) over the entries of peft LoRA matrices of a ViT.

After ``get_peft_model()`` the classifier head is set trainable and put in a ``choose_all``
group; the LoRA matrices form the selectable group, so only ``budget`` entries of them (plus
the head) ever change. Trained with ``transformers.Trainer`` and
``optimizers=(optimizer, None)``. The summary is reloaded into a model rebuilt with the same
seed (same base weights, same LoRA initialisation). Default: pretrained ViT on
CIFAR-100 (network needed); ``--offline``: small ViT on MNIST digits, with checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _torch_common as tc  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tc.add_common_args(p, steps=30)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = p.parse_args(argv)

    train, evals, num_labels = tc.vit_data(args.offline, args.n_train, args.n_eval)

    def build():
        return tc.build_lora_vit(args.offline, num_labels, args.seed, args.rank)

    model = build()
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    budget = args.budget or tc.default_budget(model, fraction=0.25)
    optimizer = tc.selective_optimizer(model, args, budget)
    losses = tc.trainer_loop(model, optimizer, train, steps=args.steps,
                             batch_size=args.batch_size, seed=args.seed)
    logits = tc.predict(model, evals)
    identical, size = tc.summary_round_trip(optimizer, model, build, evals, logits, args.summary)
    return tc.finish(losses=losses, logits=logits, labels=tc.labels_of(evals),
                     changed=tc.count_changed(before, model), budget=budget,
                     identical=identical, summary_bytes=size, check=args.offline)


if __name__ == "__main__":
    main()
