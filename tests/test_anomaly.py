import json
import math

import numpy as np
import pytest
import torch

from exactflow import Flow
from exactflow.anomaly import (
    Detector,
    anomaly_metrics,
    complexity_bits,
    fpr_at_tpr,
    quantile_threshold,
    read_labels,
    score,
)
from exactflow.cli import main
from exactflow.distributions import StandardNormal
from exactflow.errors import ConfigError, DataError, ShapeError
from exactflow.models import MAF
from exactflow.transforms import Affine


def gaussian_flow(loc=(1.0, -2.0), scale=(0.5, 2.0)) -> Flow:
    return Flow(Affine(torch.tensor(loc), torch.tensor(scale)), StandardNormal((2,)))


# -- metrics against hand-computed cases --------------------------------------------------------
def test_metrics_match_hand_computed_case():
    # inliers score 0.1, 0.4; anomalies 0.35, 0.8
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    m = anomaly_metrics(s, y, threshold=0.5)
    # pairs (anomaly, inlier) ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: 0.35<0.4
    assert m["auroc"] == pytest.approx(3 / 4)
    # ranking 0.8(+), 0.4(-), 0.35(+), 0.1(-): AP = (1/1 + 2/3) / 2
    assert m["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    # 95% TPR needs both anomalies flagged: cut at 0.35 also flags the inlier at 0.4
    assert m["fpr_at_95_tpr"] == pytest.approx(0.5)
    # threshold 0.5 flags only 0.8: precision 1, recall 1/2, F1 = 2/3
    assert (m["flagged"], m["precision"], m["recall"]) == (1, 1.0, 0.5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert (m["n"], m["n_anomalies"]) == (4, 2)


def test_metrics_perfect_and_inverted_separation():
    s = np.array([1.0, 2.0, 3.0, 10.0, 11.0])
    y = np.array([0, 0, 0, 1, 1])
    m = anomaly_metrics(s, y, threshold=5.0)
    assert m["auroc"] == 1.0 and m["average_precision"] == 1.0 and m["fpr_at_95_tpr"] == 0.0
    assert m["f1"] == 1.0
    inv = anomaly_metrics(-s, y, threshold=0.0)
    assert inv["auroc"] == 0.0 and inv["fpr_at_95_tpr"] == 1.0 and inv["f1"] == 0.0


def test_fpr_at_tpr_on_ties_and_bad_labels():
    # 10 anomalies at 5.0, inliers 0..9: reaching 95% TPR needs cut 5.0 -> inliers 5..9 flagged
    s = np.concatenate([np.arange(10.0), np.full(10, 5.0)])
    y = np.r_[np.zeros(10), np.ones(10)]
    assert fpr_at_tpr(s, y) == pytest.approx(0.5)
    with pytest.raises(DataError, match="0 \\(inlier\\) or 1"):
        anomaly_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(DataError, match="both inliers"):
        anomaly_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ShapeError, match="3 rows but there are 2"):
        anomaly_metrics([0.1, 0.2], [0, 1, 1])


def test_quantile_threshold():
    assert quantile_threshold(np.arange(101.0), 0.99) == pytest.approx(99.0)
    assert quantile_threshold(np.arange(101.0), 0.5) == pytest.approx(50.0)
    g = np.random.default_rng(0)
    cal, fresh = g.normal(size=20000), g.normal(size=20000)
    t = quantile_threshold(cal, 0.99)
    assert t == pytest.approx(2.326, abs=0.05)  # N(0,1) 99% quantile
    assert abs((fresh > t).mean() - 0.01) < 0.003
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="quantile must be in \\(0, 1\\)"):
            quantile_threshold(cal, bad)
    with pytest.raises(DataError, match="not finite"):
        quantile_threshold([1.0, np.nan], 0.9)


# -- scores -------------------------------------------------------------------------------------
def test_scores_are_the_closed_form_gaussian_nll_and_bits():
    flow = gaussian_flow()
    x = torch.tensor([[1.0, -2.0], [2.0, 0.0], [-3.0, 5.0]])
    normal = torch.distributions.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]))
    ref = -normal.log_prob(x).sum(-1).double().numpy()
    np.testing.assert_allclose(score(flow, x), ref, rtol=1e-6)
    np.testing.assert_allclose(score(flow, x, bits=True), ref / (2 * math.log(2)), rtol=1e-6)
    with pytest.raises(ShapeError, match="\\(N, 2\\)"):
        score(flow, torch.zeros(4, 3))


def test_discrete_scores_dequantise_reproducibly():
    flow = gaussian_flow((4.0, 4.0), (3.0, 3.0))
    x = torch.tensor([[3.0, 4.0], [0.0, 8.0]])
    a = Detector(flow, levels=9, seed=3).score(x)
    b = Detector(flow, levels=9, seed=3).score(x)
    c = Detector(flow, levels=9, seed=4).score(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # dequantised points lie in the cell [x, x + 1)^2: scores within the cell's NLL range
    t = torch.linspace(0, 1, 41)
    cell = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    for i in range(2):
        nll = score(flow, x[i] + cell)
        assert nll.min() - 1e-9 <= a[i] <= nll.max() + 1e-9


def test_complexity_bits_orders_simple_below_busy_images():
    blank = np.zeros((1, 28, 28))
    g = np.random.default_rng(0)
    noise = g.integers(0, 256, size=(1, 28, 28))
    bits = complexity_bits(np.concatenate([blank, noise]), levels=256)
    assert bits[0] < 200 < 784 * 8 * 0.9 < bits[1]


# -- the detector -------------------------------------------------------------------------------
def trained_maf(seed: int = 0) -> tuple[Flow, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 2, generator=g) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    torch.manual_seed(seed)
    flow = MAF(2, transforms=2, hidden=(16,))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        opt.step()
    return flow, x


def test_detector_flags_outliers_and_calibrates_its_rate():
    flow, x = trained_maf()
    det = Detector(flow, quantile=0.95).calibrate(x)
    assert det.threshold == pytest.approx(np.quantile(det.score(x), 0.95))
    assert abs(det.predict(x).mean() - 0.05) < 0.01
    g = torch.Generator().manual_seed(1)
    inl = torch.randn(200, 2, generator=g) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    out = torch.randn(50, 2, generator=g) * 0.3 + torch.tensor([4.0, -4.0])
    m = det.evaluate(torch.cat([inl, out]), np.r_[np.zeros(200), np.ones(50)])
    assert m["auroc"] > 0.99 and m["recall"] == 1.0 and m["precision"] > 0.7
    with pytest.raises(ConfigError, match="calibrate"):
        Detector(flow).predict(x)


def test_detector_save_load_round_trip(tmp_path):
    flow, x = trained_maf()
    det = Detector(flow, quantile=0.9, seed=5).calibrate(x)
    path = tmp_path / "det.safetensors"
    det.save(path, extra={"note": "unit test"})
    fresh = MAF(2, transforms=2, hidden=(16,))  # different (untrained) weights
    assert not np.allclose(Detector(fresh).score(x[:10]), det.score(x[:10]))
    back = Detector.load(path, fresh)
    assert back.threshold == det.threshold and back.quantile == 0.9 and back.seed == 5
    assert back.calibration == det.calibration
    np.testing.assert_array_equal(back.score(x), det.score(x))
    np.testing.assert_array_equal(back.predict(x), det.predict(x))
    # a pickle is refused before being read; the wrong architecture is named
    torch.save({"threshold": 1.0}, tmp_path / "evil.safetensors")
    with pytest.raises(DataError, match="never executed"):
        Detector.load(tmp_path / "evil.safetensors", fresh)
    with pytest.raises(ConfigError, match="do not fit"):
        Detector.load(path, MAF(2, transforms=3, hidden=(16,)))


# -- CLI end to end -----------------------------------------------------------------------------
def test_cli_detect_end_to_end(tmp_path, capsys):
    g = np.random.default_rng(0)
    train = g.normal(size=(400, 3)) * [1.0, 2.0, 0.5] + [0.0, 5.0, -1.0]
    np.savetxt(tmp_path / "train.csv", train, delimiter=",")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        'model = "maf"\n[model_args]\ntransforms = 2\nhidden = [16]\n'
        "[train]\nsteps = 150\nbatch_size = 64\nlr = 5e-3\neval_every = 50\nprogress = false\n"
    )
    run = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "train.csv"), "--config", str(cfg)]
    assert main([*argv, "--out", str(run), "--quiet", "--no-plots"]) == 0
    inl = g.normal(size=(90, 3)) * [1.0, 2.0, 0.5] + [0.0, 5.0, -1.0]
    outl = g.normal(size=(10, 3)) + np.array([6.0, -5.0, 4.0])
    np.save(tmp_path / "new.npy", np.concatenate([inl, outl]))
    np.savetxt(tmp_path / "y.csv", np.r_[np.zeros(90), np.ones(10)], fmt="%d")
    capsys.readouterr()
    rc = main(
        [
            *("detect", str(run), "--data", str(tmp_path / "new.npy")),
            *("--labels", str(tmp_path / "y.csv"), "--quantile", "0.95"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AUROC 1.0000" in printed and "of 100 rows flagged" in printed
    out = run / "detect"
    m = json.loads((out / "metrics.json").read_text())
    assert m["auroc"] == 1.0 and m["recall"] == 1.0 and m["quantile"] == 0.95
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "row,score,anomaly,label" and len(rows) == 101
    assert (out / "scores.png").stat().st_size > 1000
    from exactflow.app.detect import load_detector

    back = load_detector(out / "detector.safetensors", run)
    assert back.threshold == pytest.approx(m["threshold"])
    first = [float(r.split(",")[1]) for r in rows[1:4]]
    np.testing.assert_allclose(back.score_file(tmp_path / "new.npy")[:3], first, rtol=1e-6)
    # without labels: scores only; bad inputs are one-line errors with exit code 2
    assert (
        main(
            ["detect", str(run), "--data", str(tmp_path / "new.npy"), "--out", str(tmp_path / "o2")]
        )
        == 0
    )
    assert "AUROC" not in capsys.readouterr().out
    assert (tmp_path / "o2" / "scores.csv").read_text().splitlines()[0] == "row,score,anomaly"
    np.savetxt(tmp_path / "bad.csv", np.zeros((5, 2)), delimiter=",")
    assert main(["detect", str(run), "--data", str(tmp_path / "bad.csv")]) == 2
    assert "2 columns but the model expects 3" in capsys.readouterr().err
    assert main(["detect", str(run), "--data", str(tmp_path / "new.npy"), "--quantile", "1.5"]) == 2
    np.savetxt(tmp_path / "y3.csv", [0, 1, 2], fmt="%d")
    assert (
        main(
            [
                "detect",
                str(run),
                "--data",
                str(tmp_path / "new.npy"),
                "--labels",
                str(tmp_path / "y3.csv"),
            ]
        )
        == 2
    )
    assert "0 (inlier) or 1" in capsys.readouterr().err
    with pytest.raises(DataError):
        read_labels(tmp_path / "missing.csv")
