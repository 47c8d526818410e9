"""Model builders: each assembles transforms and a base into an :class:`exactflow.Flow`.

Every builder takes its first argument positionally -- ``features`` (vectors) or ``shape``
(images) -- and everything else by keyword, with one name per concept:

==================  =========================================================================
keyword             meaning
==================  =========================================================================
``transforms``      number of layers (per level for the image builders; CNFs for FFJORD)
``hidden``          conditioner widths (a tuple; channels of the conv nets for images)
``context``         context size, 0 = unconditional
``map``             the elementwise map of coupling/autoregressive layers, by name
``map_kwargs``      that map's constructor arguments
``norm``            normalisation layer: ``"batchnorm"``, ``"actnorm"`` or ``None``
``split_prior``     prior of the factored-out halves of the image builders
``sigma``           width of the flow-matching path
==================  =========================================================================

The old names (``depth``, ``couplings``, ``blocks``, ``hidden_channels``, ``spline``,
``coupling``, ``coupling_args``, ``batch_norm``, ``actnorm``, ``prior``, ``sigma_min``) and
the builders ``Planar``/``Radial`` (now :func:`PlanarFlow`/:func:`RadialFlow`, not to be
confused with the layers :class:`exactflow.transforms.Planar`/``Radial``) still work for one
release with a :class:`DeprecationWarning`.

``MODELS`` maps lowercase names to :class:`ModelSpec` entries, callable like their builders,
for configuration files and the CLI::

    flow = exactflow.models.MODELS["realnvp"](2, transforms=5, hidden=(64, 64))
"""

from __future__ import annotations

from .._compat import deprecated_attributes
from .autoregressive import IAF, MAF, NSF, NSFCoupling
from .continuous import FFJORD
from .coupling import NICE, RealNVP
from .image import Glow, ImageFlow, RealNVPImage, pixel_flow
from .matching import CFM, OTCFM, RectifiedFlow
from .simple import PlanarFlow, RadialFlow
from .spec import DATA_KINDS, INPUT_KINDS, ModelSpec

# what `exactflow train` starts from on small tables: 400-row sets overfit the default size
_TABULAR = {"tabular": {"transforms": 3, "hidden": [64, 64]}}
# affine maps on small whitened tables: a tight log-scale bound keeps test outliers from
# exploding (benchmarks/README.md, "tiny_tables.py")
_TABULAR_AFFINE = {"tabular": {**_TABULAR["tabular"], "log_scale_bound": 0.5}}
# NSF's LU-linear layers learn the correlations themselves: standardise, do not whiten
_STANDARDIZE = {"tabular": {"preprocessing": "standardize"}}
_SMALL = {"transforms": 2, "hidden": (16,)}
_ODE_SMALL = {"hidden": (8,), "atol": 1e-7, "rtol": 1e-7}
_IMAGE_SMALL = {"levels": 2, "transforms": 1, "hidden": 4}

MODELS: dict[str, ModelSpec] = {
    "nice": ModelSpec(NICE, defaults=_TABULAR, tiny=_SMALL),
    "realnvp": ModelSpec(RealNVP, defaults=_TABULAR_AFFINE, tiny=_SMALL),
    "maf": ModelSpec(MAF, defaults=_TABULAR_AFFINE, tiny=_SMALL),
    "iaf": ModelSpec(IAF, defaults=_TABULAR_AFFINE, tiny=_SMALL),
    "nsf": ModelSpec(NSF, defaults=_TABULAR, data_args=_STANDARDIZE, tiny=_SMALL),
    "nsf-coupling": ModelSpec(NSFCoupling, defaults=_TABULAR, data_args=_STANDARDIZE, tiny=_SMALL),
    "planar": ModelSpec(PlanarFlow, tiny={"transforms": 3}),
    "radial": ModelSpec(RadialFlow, tiny={"transforms": 3}),
    "ffjord": ModelSpec(FFJORD, tiny={**_ODE_SMALL, "adjoint": False}, continuous=True),
    "cfm": ModelSpec(CFM, tiny=_ODE_SMALL, continuous=True),
    "otcfm": ModelSpec(OTCFM, tiny=_ODE_SMALL, continuous=True),
    "rectified": ModelSpec(RectifiedFlow, tiny=_ODE_SMALL, continuous=True),
    "glow": ModelSpec(Glow, input="image", tiny=_IMAGE_SMALL, example=(1, 4, 4)),
    "realnvp-image": ModelSpec(RealNVPImage, input="image", tiny=_IMAGE_SMALL, example=(1, 4, 4)),
}

__getattr__ = deprecated_attributes(
    __name__, {"Planar": ("PlanarFlow", PlanarFlow), "Radial": ("RadialFlow", RadialFlow)}
)

__all__ = [
    "CFM",
    "DATA_KINDS",
    "FFJORD",
    "IAF",
    "INPUT_KINDS",
    "MAF",
    "MODELS",
    "NICE",
    "NSF",
    "OTCFM",
    "Glow",
    "ImageFlow",
    "ModelSpec",
    "NSFCoupling",
    "PlanarFlow",
    "RadialFlow",
    "RealNVP",
    "RealNVPImage",
    "RectifiedFlow",
    "pixel_flow",
]
