# Helpers shared by the test modules (e.g. ``perturb``, which moves a layer off its identity
# initialisation reproducibly) live in tests/helpers.py: ``from helpers import perturb``.
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-sweep profiles (tests/test_properties.py): "ci" is small and derandomised so CI is
# reproducible; "long" (pytest --long, or EXACTFLOW_PROPERTY_PROFILE=long) runs 10^4 cases per
# transform. EXACTFLOW_PROPERTY_EXAMPLES=N overrides the case count of either profile, so a
# documented subset (e.g. the slow CNF case) can be rerun with the same command.
settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


# Tests run many tiny ops (ODE steps, D-pass inverses) where intra-op threads only add
# overhead, and CI shares 2 cores; this is a test-session setting, never a library one.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="run the long property-sweep profile")


def pytest_configure(config):
    long = config.getoption("--long") or os.environ.get("EXACTFLOW_PROPERTY_PROFILE") == "long"
    name = "long" if long else "ci"
    examples = os.environ.get("EXACTFLOW_PROPERTY_EXAMPLES")
    if examples:
        settings.register_profile(
            f"{name}-n", settings.get_profile(name), max_examples=int(examples)
        )
        name = f"{name}-n"
    settings.load_profile(name)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
