"""The question every collective asks first, asked one way."""

from __future__ import annotations

import torch.distributed as dist


def distributed() -> bool:
    """Several workers in an initialised process group: results must be combined over them."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
