"""margin_summary: quartiles and Tukey fences by hand."""
import numpy as np
import pytest
import torch

from callbacks import margin_summary


def test_margin_summary_by_hand():
    m = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.5, 9.0])
    s = margin_summary(m)
    q1, med, q3 = np.percentile(m.numpy(), [25, 50, 75])
    assert (s["q1"], s["median"], s["q3"]) == pytest.approx((q1, med, q3))
    assert s["lower_fence"] == pytest.approx(q1 - 1.5 * (q3 - q1))
    assert s["upper_fence"] == pytest.approx(q3 + 1.5 * (q3 - q1))
    assert s["min"] == -3.0 and s["max"] == 9.0 and s["frac_negative"] == 0.25
    assert s["frac_below_fence"] == pytest.approx(float((m < q1 - 1.5 * (q3 - q1)).float().mean()))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        margin_summary(torch.zeros(2, 2))
