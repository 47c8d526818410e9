"""A bijection between a bounded prior's support and R^d, so an NPE flow keeps its mass there.

For a box ``[low, high]`` the map is, in the normalizing direction,

    u = (theta - low) / (high - low),    z = logit(u),
    log|det dz/dtheta| = sum_i [-log(high_i - low_i) - log u_i - log(1 - u_i)],

built from :class:`~exactflow.transforms.Affine` and the inverse of
:class:`~exactflow.transforms.Sigmoid`. Put it first in a posterior flow's transform,

    flow = Flow(Compose([support_transform(task), inner_transform]), base)

then ``flow.log_prob(theta, x)`` is an exact density on the box and ``flow.sample`` (the
inverse, ``theta = low + (high - low) sigmoid(z)``) can only land inside it; in float32 a
``|z| > ~17`` saturates onto the closed box's faces, never beyond. An unbounded prior gets the
identity (an empty :class:`~exactflow.transforms.Compose`).
"""

from __future__ import annotations

import torch

from ..data.dataset import support_bijection
from ..errors import DTypeError
from ..transforms import Compose, Transform
from .tasks import Simulator

__all__ = ["support_transform"]


def support_transform(task: Simulator, dtype: torch.dtype | None = None) -> Transform:
    """The box-to-R^d bijection of ``task``'s prior (identity if unbounded); see the module.

    Args:
        task: a :class:`~exactflow.sbi.Simulator` (or anything with a ``bounds`` attribute,
            ``(low, high)`` ``(D,)`` tensors or ``None``), e.g. ``get_task("two_moons")``.
        dtype: dtype of the transform's buffers (default torch's; ``.to()`` moves them later).

    Returns:
        A Transform on ``(*batch, D)`` whose ``forward`` maps the box to ``R^D`` and whose
        ``inverse`` maps ``R^D`` into the box.
    """
    if not hasattr(task, "bounds"):
        raise DTypeError(
            f"support_transform needs a Simulator (with .bounds), got {type(task).__name__}"
        )
    bounds = task.bounds
    if bounds is None:
        return Compose([])
    return support_bijection(*bounds, dtype=dtype or torch.get_default_dtype())
