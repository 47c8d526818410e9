"""exactflow: normalizing flows with exact likelihoods.

import exactflow as ef
flow = ef.Flow(ef.transforms.Affine(2.0, 3.0), ef.distributions.StandardNormal(()))
flow.log_prob(torch.tensor(5.0))   # = Normal(2, 3).log_prob(5.0)
"""

from . import check, distributions, errors, matching, models, nets, transforms
from .distributions import StandardNormal
from .flow import Flow

__version__ = "0.1.0"

# Subpackages with optional dependencies (scikit-learn, safetensors, onnx, ...) load on first use,
# so `import exactflow` needs only torch and numpy.
_LAZY = ("anomaly", "continuous", "data", "export", "plotting", "sbi", "train", "vae", "vi")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'exactflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazily loaded subpackages (so tab completion finds them)."""
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Flow",
    "StandardNormal",
    "__version__",
    "check",
    "distributions",
    "errors",
    "matching",
    "models",
    "nets",
    "transforms",
]
