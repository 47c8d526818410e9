"""Seeded 2-D toy densities for quick experiments and plots.

Every sampler has the signature ``sampler(n, generator=None) -> Tensor (n, 2)`` (float32) and
draws i.i.d. points, so any prefix of a sample is itself a sample. All densities live roughly
in ``[-4, 4]^2``. ``TOY`` maps names to samplers; :func:`toy_splits` draws a seeded
train/val/test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, DTypeError
from .splits import Splits, split

__all__ = [
    "LABELED",
    "TOY",
    "Splits",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "labeled_eight_gaussians",
    "labeled_moons",
    "labeled_toy_splits",
    "moons",
    "pinwheel",
    "spirals",
    "split",
    "swissroll",
    "toy_splits",
]


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise DTypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ConfigError(f"n must be non-negative, got {n}")
    return n


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator)


def _normal(shape, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator)


def _coin(n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """Independent uniform choices among ``k`` components, shape ``(n,)``."""
    return torch.randint(0, k, (n,), generator=generator)


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> Tensor:
    """Two interleaving half circles with Gaussian jitter ``noise`` (centred, ~[-1.5, 2.5])."""
    return labeled_moons(n, generator, noise)[0]


def labeled_moons(
    n: int, generator: torch.Generator | None = None, noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """:func:`moons` (the same draws) and each point's moon, ``(n, 2)`` and ``(n,)`` in {0, 1}."""
    _check_n(n)
    label = _coin(n, 2, generator)
    which = label.float()
    t = math.pi * _uniform(n, generator)
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=-1)
    lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=-1)
    pts = torch.where(which[:, None] > 0.5, lower, upper)
    pts = pts + noise * _normal((n, 2), generator)
    # centre the pair of moons on the origin and give it a unit-ish scale
    return (pts - torch.tensor([0.5, 0.25])) * 2.0, label


def eight_gaussians(
    n: int, generator: torch.Generator | None = None, radius: float = 2.0, std: float = 0.2
) -> Tensor:
    """Equal mixture of eight isotropic Gaussians (std ``std``) on a circle of ``radius``."""
    return labeled_eight_gaussians(n, generator, radius, std)[0]


def labeled_eight_gaussians(
    n: int, generator: torch.Generator | None = None, radius: float = 2.0, std: float = 0.2
) -> tuple[Tensor, Tensor]:
    """:func:`eight_gaussians` (the same draws) and each point's component in {0, ..., 7}."""
    _check_n(n)
    label = _coin(n, 8, generator)
    angle = label.float() * (2.0 * math.pi / 8.0)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return centres + std * _normal((n, 2), generator), label


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform density on the 8 'black' unit squares of a 4x4 board covering ``[-2, 2]^2``."""
    _check_n(n)
    cell = _coin(n, 8, generator)
    row = cell // 2  # 4 rows, 2 black cells per row
    col = 2 * (cell % 2) + (row % 2)  # black cells alternate between rows
    offset = torch.rand((n, 2), generator=generator)
    return torch.stack([col.float(), row.float()], dim=-1) + offset - 2.0


def circles(
    n: int, generator: torch.Generator | None = None, radii=(1.0, 2.0), noise: float = 0.08
) -> Tensor:
    """Two concentric rings of radius ``radii`` (equal mass), radial jitter ``noise``."""
    _check_n(n)
    which = _coin(n, 2, generator)
    r = torch.tensor([float(radii[0]), float(radii[1])])[which]
    t = 2.0 * math.pi * _uniform(n, generator)
    pts = r[:, None] * torch.stack([torch.cos(t), torch.sin(t)], dim=-1)
    return pts + noise * _normal((n, 2), generator)


def swissroll(n: int, generator: torch.Generator | None = None, noise: float = 0.25) -> Tensor:
    """The 2-D Swiss roll ``t (cos t, sin t)``, ``t ~ U[1.5 pi, 4.5 pi]``, scaled by 1/5."""
    _check_n(n)
    t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(n, generator))
    pts = t[:, None] * torch.stack([torch.cos(t), torch.sin(t)], dim=-1)
    return (pts + noise * _normal((n, 2), generator)) / 5.0


def pinwheel(
    n: int,
    generator: torch.Generator | None = None,
    arms: int = 5,
    radial_std: float = 0.3,
    tangential_std: float = 0.1,
    rate: float = 0.25,
) -> Tensor:
    """``arms`` curved Gaussian arms; each arm bends by ``rate * exp(radius)``."""
    _check_n(n)
    arm = _coin(n, arms, generator).float()
    eps = _normal((n, 2), generator)
    radial = 1.0 + radial_std * eps[:, 0]
    tangential = tangential_std * eps[:, 1]
    angle = arm * (2.0 * math.pi / arms) + rate * torch.exp(radial)
    c, s = torch.cos(angle), torch.sin(angle)
    x = c * radial - s * tangential
    y = s * radial + c * tangential
    return 2.0 * torch.stack([x, y], dim=-1)


def spirals(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> Tensor:
    """Two interleaved Archimedean spirals (second = first rotated by pi), ~[-3, 3]^2."""
    _check_n(n)
    which = _coin(n, 2, generator).float()
    t = torch.sqrt(_uniform(n, generator)) * 3.0 * math.pi
    pts = t[:, None] * torch.stack([-torch.cos(t), torch.sin(t)], dim=-1) / math.pi
    sign = 1.0 - 2.0 * which
    return sign[:, None] * pts + noise * _normal((n, 2), generator)


TOY: dict[str, Callable[..., Tensor]] = {
    "moons": moons,
    "eight_gaussians": eight_gaussians,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "circles": circles,
    "swissroll": swissroll,
    "pinwheel": pinwheel,
    "spirals": spirals,
}


# toys with a class label per point: name -> (sampler returning (points, labels), classes)
LABELED: dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], int]] = {
    "moons": (labeled_moons, 2),
    "eight_gaussians": (labeled_eight_gaussians, 8),
    "8gaussians": (labeled_eight_gaussians, 8),
}


def labeled_toy_splits(
    name: str, n_train: int = 10_000, n_val: int = 2_000, n_test: int = 10_000, seed: int = 0
) -> tuple[Splits, Splits]:
    """:func:`toy_splits` of a toy in :data:`LABELED` (the same points for the same seed)
    and the splits' integer labels."""
    if name not in LABELED:
        raise ConfigError(
            f"toy dataset {name!r} has no label to condition on; labelled toys: "
            f"{', '.join(sorted(LABELED))}"
        )
    g = torch.Generator().manual_seed(int(seed))
    sampler = LABELED[name][0]
    parts = [sampler(n, g) for n in (n_train, n_val, n_test)]
    return Splits(*(p[0] for p in parts)), Splits(*(p[1] for p in parts))


def toy_splits(
    name: str,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 10_000,
    seed: int = 0,
) -> Splits:
    """Draw independent, seeded train/val/test samples from the toy density ``name``.

    Returns:
        :class:`Splits` with tensors ``(n_train, 2)``, ``(n_val, 2)``, ``(n_test, 2)``.
    """
    if name not in TOY:
        raise ConfigError(f"unknown toy dataset {name!r}; valid: {', '.join(sorted(TOY))}")
    g = torch.Generator().manual_seed(int(seed))
    sampler = TOY[name]
    return Splits(sampler(n_train, g), sampler(n_val, g), sampler(n_test, g))
