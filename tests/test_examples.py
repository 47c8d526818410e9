"""Every script in examples/ runs in its --smoke mode (so the docs' figures never rot), and
its returned numbers satisfy the property the guide states."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, out: Path):
    """Import ``examples/<name>.py`` as a module and call ``main(["--smoke", "--out", out])``."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--smoke", "--out", str(out)])
    assert (out / f"{name}.png").stat().st_size > 1000, "the script wrote no figure"
    return result


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    tested = {
        "change_of_variables",
        "logdet_cost",
        "coupling_flows",
        "maf_vs_iaf",
        "spline_maps",
        "cnf_decay",
        "hutchinson_variance",
        "dequantization",
        "variational_inference",
        "export_onnx",
        "anomaly_detection",
        "glow_digits",
        "adjoint_memory",
        "rnode_nfe",
        "flow_matching_paths",
    }
    assert scripts == tested, f"untested or missing examples: {scripts ^ tested}"


def test_change_of_variables(tmp_path):
    r = run_example("change_of_variables", tmp_path)
    assert r["err_1d"] < 1e-10  # log_prob of x = tanh(z) equals the closed form
    assert 0.98 < r["mass_2d"] < 1.0  # density integrates to ~1 on the box (tails outside)


def test_logdet_cost(tmp_path):
    r = run_example("logdet_cost", tmp_path)
    assert set(r) == {4, 8}
    assert all(t > 0 for row in r.values() for t in row.values())


def test_coupling_flows(tmp_path):
    r = run_example("coupling_flows", tmp_path)
    # 5 steps from the identity: still about the standard normal's NLL on this data, finite
    assert all(math.isfinite(v) and 2.0 < v < 6.0 for v in r.values())


def test_maf_vs_iaf(tmp_path):
    r = run_example("maf_vs_iaf", tmp_path)
    assert set(r[2]) == {"MAF log_prob", "MAF sample", "IAF log_prob", "IAF sample"}


def test_spline_maps(tmp_path):
    r = run_example("spline_maps", tmp_path)
    assert r["rational-quadratic round trip"] < 1e-10
    assert r["monotone cubic round trip"] < 1e-10
    assert math.isfinite(r["nsf test nll"])


def test_cnf_decay(tmp_path):
    r = run_example("cnf_decay", tmp_path)
    # f(z) = -z: log_prob is log N(x; 0, e² I) up to the solver tolerance (1e-9)
    assert r["exact max error"] < 1e-6
    assert r["hutchinson-rademacher max error"] < 1e-6  # εᵀ(−I)ε = −D exactly for ±1 probes
    assert r["hutchinson-gaussian max error"] > 1e-3  # Gaussian probes are noisy


def test_hutchinson_variance(tmp_path):
    r = run_example("hutchinson_variance", tmp_path)
    for row in r.values():
        # 500 probes: the sample variance is within ~20 % of the closed form (χ² spread)
        for kind in ("rademacher", "gaussian"):
            assert row[f"{kind} var"] == pytest.approx(row[f"{kind} closed"], rel=0.35)
        assert row["rademacher closed"] < row["gaussian closed"]


def test_dequantization(tmp_path):
    r = run_example("dequantization", tmp_path)
    assert r["uniform"] == pytest.approx(math.log2(17))
    # Jensen: the dequantised NLL bounds the exact discrete NLL from above
    assert r["gaussian dequantised bound"] >= r["gaussian exact discrete"]
    assert r["histogram"] < r["gaussian exact discrete"] < r["uniform"]


def test_variational_inference(tmp_path):
    r = run_example("variational_inference", tmp_path)
    # the ELBO bounds log Z from below (up to Monte Carlo error), whatever the training
    assert r["elbo"] <= r["log_z_grid"] + 3 * r["elbo_se"]
    assert math.isfinite(r["log_z_is"])


def test_export_onnx(tmp_path):
    r = run_example("export_onnx", tmp_path)
    # float32 graphs: the same numbers as PyTorch up to rounding
    assert r["log_prob max abs diff"] < 1e-4
    assert r["sample max abs diff"] < 1e-4


def test_anomaly_detection(tmp_path):
    r = run_example("anomaly_detection", tmp_path)
    # even 5 steps from a standard normal separate uniform outliers better than chance
    assert 0.5 < r["auroc"] <= 1.0
    assert 0.0 <= r["fpr_at_95_tpr"] <= 1.0


def test_glow_digits(tmp_path):
    r = run_example("glow_digits", tmp_path)
    # the LU 1x1 conv's log-det H W sum log|s_i| equals H W slogdet(W) (float32 rounding)
    assert r["lu logdet error"] < 1e-4
    # a dequantised NLL bounds the positive discrete entropy from above
    assert 0.0 < r["bpd trained"] < 10.0 and 0.0 < r["bpd init"] < 10.0


def test_adjoint_memory(tmp_path):
    r = run_example("adjoint_memory", tmp_path)
    few, many = r["steps"][2], r["steps"][8]
    # backprop through the solver keeps every step's graph: 4x the steps, ~4x the memory
    assert many["direct"]["peak_mb"] > 3.0 * few["direct"]["peak_mb"]
    # the adjoint keeps one evaluation's graph at a time, whatever the number of steps
    assert many["adjoint"]["peak_mb"] == pytest.approx(few["adjoint"]["peak_mb"], rel=0.05)
    assert many["adjoint"]["peak_mb"] < many["direct"]["peak_mb"] / 10
    for sweep in r.values():
        for row in sweep.values():
            assert row["adjoint"]["nfe_backward"] > 0 and row["direct"]["nfe_backward"] == 0
            assert row["grad rel diff"] < 1e-3  # the same gradient, up to the backward solve


def test_rnode_nfe(tmp_path):
    r = run_example("rnode_nfe", tmp_path)
    assert set(r) == {"plain", "RNODE"}
    for row in r.values():
        assert math.isfinite(row["test NLL"]) and row["final NFE"] >= 8  # dopri5: >= 1 step
        assert [s for s, _, _ in row["log"]] == [2, 4]


def test_flow_matching_paths(tmp_path):
    r = run_example("flow_matching_paths", tmp_path)
    assert set(r) == {"CFM", "OT-CFM", "rectified flow", "rectified flow + reflow"}
    for row in r.values():
        # a path is never shorter than its chord, and S is a mean of squares
        assert row["length ratio"] >= 1.0 - 1e-6 and row["straightness"] >= 0.0
        assert math.isfinite(row["1-step SW"]) and math.isfinite(row["test NLL"])
