import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-sweep profiles (tests/test_properties.py): "ci" is small and derandomised so CI is
# reproducible; "long" (pytest --long, or EXACTFLOW_PROPERTY_PROFILE=long) runs 10^4 cases per
# transform.
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
    settings.load_profile("long" if long else "ci")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
