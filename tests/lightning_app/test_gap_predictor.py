"""GapPredictor: recovers known coefficients, R² / adjusted R² / CV R² against numpy, transfer."""
import numpy as np
import pytest

from lightning_app.gap_predictor import GapPredictor, jiang_features, signed_log
from marginboost.errors import ConfigError

pytest.importorskip("statsmodels")

TRUE = {"intercept": 0.3, "a": 1.5, "b": -0.7, "c": 0.0}


def _rows(n=200, noise=0.05, seed=0, coef=TRUE, fraction=1.0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        x = {"a": rng.uniform(0.1, 5.0), "b": rng.uniform(-3.0, 3.0), "c": rng.uniform(0.0, 2.0)}
        gap = coef["intercept"] + sum(coef[k] * signed_log(np.array(v)) for k, v in x.items())
        rows.append({**x, "gap": float(gap + noise * rng.standard_normal()), "fraction": fraction, "g": rng.integers(3)})
    return rows


def _lstsq(rows, feats):
    x = np.hstack([np.ones((len(rows), 1)), signed_log(np.array([[r[f] for f in feats] for r in rows]))])
    y = np.array([r["gap"] for r in rows])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    return beta, x, y


def test_recovers_known_coefficients_with_honest_standard_errors():
    rows = _rows()
    p = GapPredictor(["a", "b", "c"]).fit(rows)
    coefs = {c.name: c for c in p.coefficients()}
    for name, true in TRUE.items():
        assert abs(coefs[name].value - true) < 4 * coefs[name].stderr, name
        assert coefs[name].stderr < 0.05
    # standard errors: sqrt(diag(s² (XᵀX)⁻¹)) computed with numpy
    beta, x, y = _lstsq(rows, ["a", "b", "c"])
    resid = y - x @ beta
    s2 = resid @ resid / (len(y) - x.shape[1])
    se = np.sqrt(np.diag(s2 * np.linalg.inv(x.T @ x)))
    assert np.allclose([c.value for c in p.coefficients()], beta, atol=1e-10)
    assert np.allclose([c.stderr for c in p.coefficients()], se, rtol=1e-8)
    assert coefs["c"].pvalue > 0.001 and coefs["a"].pvalue < 1e-10


def test_r2_adjusted_r2_and_cross_validated_r2_by_hand():
    rows = _rows(n=60, noise=0.5, seed=3)
    p = GapPredictor(["a", "b", "c"]).fit(rows)
    beta, x, y = _lstsq(rows, ["a", "b", "c"])
    r2 = 1 - np.sum((y - x @ beta) ** 2) / np.sum((y - y.mean()) ** 2)
    assert p.r2 == pytest.approx(r2, rel=1e-10)
    assert p.adjusted_r2 == pytest.approx(1 - (1 - r2) * (60 - 1) / (60 - 3 - 1), rel=1e-10)
    cv = p.cross_validate(rows, k=5, seed=0)
    from sklearn.model_selection import KFold
    pred = np.empty(60)
    for tr, te in KFold(5, shuffle=True, random_state=0).split(x):
        b, *_ = np.linalg.lstsq(x[tr], y[tr], rcond=None)
        pred[te] = x[te] @ b
    assert np.allclose(cv["predictions"], pred, atol=1e-10)
    assert cv["r2"] == pytest.approx(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2), rel=1e-10)
    assert cv["r2"] < p.r2  # out of sample is worse than in sample


def test_transfer_and_held_out_split():
    final = _rows(n=80, seed=1)
    other = {"intercept": 0.0, "a": -1.0, "b": 0.2, "c": 0.0}
    early = _rows(n=80, seed=2, coef=other, fraction=0.5)
    p = GapPredictor(["a", "b", "c"])
    t = p.transfer(final + early, fit_fraction=1.0)
    fit = GapPredictor(["a", "b", "c"]).fit(final)
    assert set(t) == {0.5} and t[0.5] == pytest.approx(fit.score(early))
    assert t[0.5] < 0  # another law at the early checkpoint: no transfer
    same = _rows(n=80, seed=2, fraction=0.5)
    assert p.transfer(final + same, 1.0)[0.5] > 0.95
    res = p.held_out(final, lambda r: r["g"] == 0)
    assert res["n_test"] == sum(r["g"] == 0 for r in final) and res["r2"] > 0.95


def test_bad_features_and_defaults():
    assert jiang_features(("out",)) == ["nm_out_q1", "nm_out_median", "nm_out_q3", "nm_out_lower_fence",
                                        "nm_out_upper_fence"]
    with pytest.raises(ConfigError, match="GapPredictor.features: 'zzz'"):
        GapPredictor(["zzz"]).fit(_rows(n=10))
    with pytest.raises(ConfigError, match="GapPredictor.transform"):
        GapPredictor(["a"], transform="sqrt")
