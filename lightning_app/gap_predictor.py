r"""``GapPredictor``: the generalization gap as a linear function of (log) margin-distribution features.

Jiang et al. (ICLR 2019) fit ordinary least squares

.. math::
    \hat g = c + \sum_k a_k\, \phi(x_k)

where :math:`x_k` are the quartiles and Tukey fences of the normalized margins at a few layers and
:math:`\phi` is the logarithm. Statistics of margins can be zero or negative (misclassified
training objects, a lower fence below zero), so the log is taken as the signed
:math:`\phi(x) = \operatorname{sign}(x)\log(1 + |x|)`, equal to :math:`\log(1+x)` on positive
values. The fit is statsmodels' OLS (coefficients with standard errors); scores are R² and
adjusted R² in sample, k-fold cross-validated R² (out-of-fold predictions against the total sum of
squares), R² on a split held out by a hyperparameter's value, and R² on the rows of other training
checkpoints (the transfer test). Needs the ``studies`` extra (statsmodels, pandas).

Rows are mappings (e.g. :func:`lightning_app.zoo.read_results`) holding the feature columns and
the target column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from marginboost.errors import ConfigError, check_choice, check_int

TRANSFORMS = ("signed_log", "none")
#: Jiang et al.'s signature: quartiles and fences at hidden layers and the output.
JIANG_STATS = ("q1", "median", "q3", "lower_fence", "upper_fence")


def jiang_features(layers: Sequence[str] = ("first", "last", "out")) -> list[str]:
    """The zoo's column names of Jiang et al.'s signature at ``layers`` (``nm_<layer>_<stat>``)."""
    return [f"nm_{layer}_{stat}" for layer in layers for stat in JIANG_STATS]


def signed_log(x: np.ndarray) -> np.ndarray:
    """:math:`\\operatorname{sign}(x)\\log(1+|x|)`, elementwise.

    Example:
        >>> signed_log(np.array([-np.e + 1, 0.0, np.e - 1])).round(6).tolist()
        [-1.0, 0.0, 1.0]
    """
    return np.sign(x) * np.log1p(np.abs(x))


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """:math:`1 - \\sum (y - \\hat y)^2 / \\sum (y - \\bar y)^2`."""
    from sklearn.metrics import r2_score as sk_r2

    return float(sk_r2(y, pred))


@dataclass
class Coefficient:
    name: str
    value: float
    stderr: float
    pvalue: float


class GapPredictor:
    """OLS of ``target`` on the transformed ``features``, with an intercept.

    Args:
        features: column names (default: :func:`jiang_features`).
        target: the column to predict (default ``gap``).
        transform: ``signed_log`` (default) or ``none``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> rows = [{"a": a, "gap": 0.5 + 2.0 * signed_log(a)} for a in rng.uniform(0, 3, 30)]
        >>> p = GapPredictor(["a"]).fit(rows)
        >>> [round(c.value, 6) for c in p.coefficients()]
        [0.5, 2.0]
    """

    def __init__(self, features: Sequence[str] | None = None, target: str = "gap",
                 transform: str = "signed_log") -> None:
        self.features = list(features) if features is not None else jiang_features()
        if not self.features:
            raise ConfigError("GapPredictor.features", self.features, "a non-empty list of column names")
        self.target = target
        self.transform = check_choice("GapPredictor.transform", transform, TRANSFORMS)
        self.result = None

    # -- data -------------------------------------------------------------------------------
    def design(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The design matrix ``[n, 1 + p]``: a column of ones, then the transformed features."""
        missing = [f for f in self.features if rows and f not in rows[0]]
        if missing:
            raise ConfigError("GapPredictor.features", missing[0], f"a column of the rows: {sorted(rows[0])}")
        x = np.array([[float(r[f]) for f in self.features] for r in rows], dtype=np.float64)
        if self.transform == "signed_log":
            x = signed_log(x)
        return np.hstack([np.ones((len(rows), 1)), x])

    def targets(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.array([float(r[self.target]) for r in rows], dtype=np.float64)

    # -- fit and predict --------------------------------------------------------------------
    def fit(self, rows: Sequence[Mapping[str, Any]]) -> GapPredictor:
        import statsmodels.api as sm

        if len(rows) <= len(self.features) + 1:
            raise ValueError(f"GapPredictor.fit: {len(rows)} rows for {len(self.features) + 1} coefficients")
        self.result = sm.OLS(self.targets(rows), self.design(rows)).fit()
        return self

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if self.result is None:
            raise RuntimeError("GapPredictor.predict: call fit first")
        return self.result.predict(self.design(rows))

    def coefficients(self) -> list[Coefficient]:
        """Intercept first, then one per feature: value, standard error, two-sided p-value."""
        if self.result is None:
            raise RuntimeError("GapPredictor.coefficients: call fit first")
        names = ["intercept", *self.features]
        return [Coefficient(n, float(v), float(s), float(p))
                for n, v, s, p in zip(names, self.result.params, self.result.bse, self.result.pvalues)]

    @property
    def r2(self) -> float:
        return float(self.result.rsquared)

    @property
    def adjusted_r2(self) -> float:
        """:math:`1 - (1 - R^2)(n - 1)/(n - p - 1)`."""
        return float(self.result.rsquared_adj)

    def score(self, rows: Sequence[Mapping[str, Any]]) -> float:
        """R² of this fit's predictions on ``rows`` (other rows than the fit's: out of sample)."""
        return r2_score(self.targets(rows), self.predict(rows))

    # -- validation -------------------------------------------------------------------------
    def _clone(self) -> GapPredictor:
        return GapPredictor(self.features, self.target, self.transform)

    def cross_validate(self, rows: Sequence[Mapping[str, Any]], k: int = 5, seed: int = 0) -> dict[str, Any]:
        """k-fold CV (shuffled, seeded): ``r2`` of the pooled out-of-fold predictions, the per-fold
        R² (``fold_r2``), and the out-of-fold ``predictions`` in row order."""
        from sklearn.model_selection import KFold

        check_int("GapPredictor.k", k, low=2, high=len(rows))
        y = self.targets(rows)
        pred = np.empty_like(y)
        folds = []
        for train, test in KFold(k, shuffle=True, random_state=seed).split(np.arange(len(rows))):
            model = self._clone().fit([rows[i] for i in train])
            pred[test] = model.predict([rows[i] for i in test])
            folds.append(r2_score(y[test], pred[test]))
        return {"r2": r2_score(y, pred), "fold_r2": folds, "predictions": pred}

    def held_out(self, rows: Sequence[Mapping[str, Any]],
                 is_test: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any]:
        """Fit on the rows where ``is_test`` is false, score on the others (e.g. one label-noise level)."""
        train = [r for r in rows if not is_test(r)]
        test = [r for r in rows if is_test(r)]
        if not test or not train:
            raise ValueError(f"GapPredictor.held_out: {len(train)} training and {len(test)} test rows")
        model = self._clone().fit(train)
        return {"r2": model.score(test), "n_train": len(train), "n_test": len(test),
                "predictions": model.predict(test), "targets": model.targets(test)}

    def transfer(self, rows: Sequence[Mapping[str, Any]], fit_fraction: float = 1.0,
                 column: str = "fraction") -> dict[float, float]:
        """Fit on the rows at checkpoint ``fit_fraction``; R² on the rows of every other checkpoint."""
        fit_rows = [r for r in rows if float(r[column]) == fit_fraction]
        model = self._clone().fit(fit_rows)
        out = {}
        for f in sorted({float(r[column]) for r in rows}):
            if f != fit_fraction:
                out[f] = model.score([r for r in rows if float(r[column]) == f])
        return out


__all__ = ["JIANG_STATS", "TRANSFORMS", "Coefficient", "GapPredictor", "jiang_features", "r2_score", "signed_log"]
