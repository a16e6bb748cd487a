"""Selective fine-tuning of a ViT image classifier with a plain PyTorch loop.

    optimizer = get_selective_optimizer(torch.optim.AdamW, "id3")(
        params=[{"params": head, "choose_all": True}, {"params": body}],
        lr=..., budget=..., max_steps=..., exp=..., eps=...)

Default: the pretrained ``google/vit-base-patch16-224-in21k`` on CIFAR-100 (needs the
network and ``datasets``). ``--offline``: a small ViT built from a config on a few hundred
MNIST digits, checking that the loss goes down, the budget holds and the summary reloads.
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
    args = p.parse_args(argv)

    train, evals, num_labels = tc.vit_data(args.offline, args.n_train, args.n_eval)
    model = tc.build_vit(args.offline, num_labels, args.seed)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    budget = args.budget or tc.default_budget(model)
    optimizer = tc.selective_optimizer(model, args, budget)
    losses = tc.train_loop(model, optimizer, train, steps=args.steps,
                           batch_size=args.batch_size, seed=args.seed, desc=f"vit {args.method}")
    logits = tc.predict(model, evals)
    identical, size = tc.summary_round_trip(
        optimizer, model, lambda: tc.build_vit(args.offline, num_labels, args.seed), evals,
        logits, args.summary)
    return tc.finish(losses=losses, logits=logits, labels=tc.labels_of(evals),
                     changed=tc.count_changed(before, model), budget=budget,
                     identical=identical, summary_bytes=size, check=args.offline)


if __name__ == "__main__":
    main()
