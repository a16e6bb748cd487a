"""``from selective_optimizers.wrap import get_selective_optimizer`` (re-exported from torch_bridge)."""

from torch_bridge.optimizer import get_selective_optimizer

__all__ = ["get_selective_optimizer"]
