"""Fine-tune a sharded Flax NNX model with ID3.

The model's parameters are sharded over a 2-D ("data", "model") mesh; the batch is split over
"data". ID3 picks the entries to train from the whole model at once (a global top-k), and its
mask is sharded like the parameters, so nothing is gathered onto one device.

Runs on 8 simulated CPU devices when no accelerator is present:

    python examples/sharded_id3.py [--steps 30] [--budget 500]
"""

from __future__ import annotations

import argparse
import os

# Simulated devices must be requested before jax is imported (harmless on real accelerators).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_selective as osel  # noqa: E402


class MLP(nnx.Module):
    """Two dense layers; hidden units are split over "model", inputs and outputs are not."""

    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            din,
            hidden,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, (None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
        )
        self.down = nnx.Linear(
            hidden,
            dout,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("model", None)),
        )

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def main(steps: int = 30, budget: int = 500, hidden: int = 256) -> dict:
    n = jax.device_count()
    model_axis = 4 if n % 4 == 0 else 1
    mesh = jax.make_mesh(
        (n // model_axis, model_axis),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(16, 4)).astype(np.float32))
    batch = NamedSharding(mesh, P("data"))
    x, y = jax.device_put(x, batch), jax.device_put(y, batch)

    with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
        model = MLP(16, hidden, 4, rngs=nnx.Rngs(0))  # parameters are created sharded
        # The wrapper form keeps unselected entries bit-identical even under adamw's decay.
        tx = osel.selective_id3(budget, max_steps=steps // 2, inner=optax.adamw(1e-2))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]

    params = nnx.state(model, nnx.Param)
    mask = osel.selected_mask(optimizer.opt_state)
    for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
        assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding, p.sharding)
    osel.verify(before, jax.tree.map(np.asarray, params), optimizer.opt_state, budget)
    used = osel.budget_used(optimizer.opt_state)
    kernel = model.up.kernel.get_value()
    print(f"devices: {n}, mesh: {dict(mesh.shape)}, up.kernel sharded as {kernel.sharding.spec}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; entries trained: {used} of budget {budget}")
    return {"losses": losses, "budget_used": used}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget", type=int, default=500)
    args = parser.parse_args()
    main(args.steps, args.budget)
