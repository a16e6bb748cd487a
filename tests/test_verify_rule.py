"""One rule of "unchanged" for both frameworks (issue 12): JAX's verify and the torch
bridge's verify=True compare bit patterns through optax_selective.verify.changed_entries."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optax_selective.verify import changed_entries  # noqa: E402
from torch_bridge.verify import changed  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_torch_and_jax_agree_on_signed_zeros_and_nan_payloads(dtype):
    before = torch.tensor([0.0, float("nan"), 1.0, -0.0, 2.0], dtype=getattr(torch, dtype))
    after = before.clone()
    after[0] = -0.0  # a change
    after[3] = 0.0  # a change
    bits = after.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[after.element_size()])
    bits[1] = bits[1] ^ 1  # another NaN payload: a change
    want = [True, True, False, True, False]
    assert changed(before, after).tolist() == want
    as_np = {2: np.uint16, 4: np.uint32, 8: np.uint64}[before.element_size()]
    view = lambda t: t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().view(as_np)  # noqa: E731
    assert changed_entries(view(before), view(after)).tolist() == want
