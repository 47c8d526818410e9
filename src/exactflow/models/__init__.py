"""Model builders: each assembles transforms and a base into an :class:`exactflow.Flow`.

``MODELS`` maps lowercase names to builders, for configuration files and the CLI::

    flow = exactflow.models.MODELS["realnvp"](2, transforms=5, hidden=(64, 64))
"""

from __future__ import annotations

from collections.abc import Callable

from ..flow import Flow
from .autoregressive import IAF, MAF, NSF
from .continuous import FFJORD
from .coupling import NICE, RealNVP
from .image import Glow, RealNVPImage
from .matching import CFM, OTCFM, RectifiedFlow
from .simple import Planar, Radial


def NSFCoupling(features: int, **kwargs) -> Flow:
    """:func:`NSF` with coupling layers (``autoregressive=False``); same other arguments."""
    if "autoregressive" in kwargs:
        raise TypeError("NSFCoupling fixes autoregressive=False; use NSF to choose")
    return NSF(features, autoregressive=False, **kwargs)


MODELS: dict[str, Callable[..., Flow]] = {
    "nice": NICE,
    "realnvp": RealNVP,
    "maf": MAF,
    "iaf": IAF,
    "nsf": NSF,
    "nsf-coupling": NSFCoupling,
    "planar": Planar,
    "radial": Radial,
    "ffjord": FFJORD,
    "cfm": CFM,
    "otcfm": OTCFM,
    "rectified": RectifiedFlow,
    "glow": Glow,  # image builders take shape=(C, H, W)
    "realnvp-image": RealNVPImage,
}

__all__ = [
    "IAF",
    "MAF",
    "MODELS",
    "NICE",
    "NSF",
    "Glow",
    "NSFCoupling",
    "Planar",
    "Radial",
    "RealNVP",
    "RealNVPImage",
]
