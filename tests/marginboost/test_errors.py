"""The one error type and its checks: one line naming the field, what was given, what is allowed."""
import pickle

import pytest

from marginboost import ConfigError, check_bool, check_choice, check_int, check_number


def test_message_format_and_fields():
    err = ConfigError("boosting.rounds", 0, "an integer >= 1")
    assert str(err) == "boosting.rounds: 0; allowed: an integer >= 1"
    assert (err.field, err.given, err.allowed) == ("boosting.rounds", 0, "an integer >= 1")
    assert isinstance(err, ValueError)
    assert str(ConfigError("model.backbone", "resnet19", "resnet18")) == "model.backbone: 'resnet19'; allowed: resnet18"
    assert str(ConfigError("x", "a DataLoader", "a DataModule", describe=True)) == "x: a DataLoader; allowed: a DataModule"
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries (DDP, workers) intact
    assert str(again) == str(err) and again.field == "boosting.rounds"


@pytest.mark.parametrize("value, low, high, ok", [
    (3, 1, None, True), (0, 1, None, False), (True, 0, None, False), (2.0, 0, None, False),
    (5, 1, 4, False), (4, 1, 4, True), ("3", None, None, False),
])
def test_check_int(value, low, high, ok):
    if ok:
        assert check_int("f", value, low, high) == value
    else:
        with pytest.raises(ConfigError, match=r"^f: .*; allowed: an integer"):
            check_int("f", value, low, high)


@pytest.mark.parametrize("value, kwargs, ok", [
    (0.5, {"low": 0.0}, True), (0, {"low": 0.0}, True), (0.0, {"low": 0.0, "low_open": True}, False),
    (float("nan"), {}, False), (float("inf"), {}, False), (float("inf"), {"finite": False}, True),
    (True, {}, False), ("0.1", {}, False), (2.0, {"high": 1.0}, False),
])
def test_check_number(value, kwargs, ok):
    if ok:
        assert check_number("f", value, **kwargs) == float(value)
    else:
        with pytest.raises(ConfigError, match=r"^f: .*; allowed: a (finite )?number"):
            check_number("f", value, **kwargs)


def test_check_bool_and_choice():
    assert check_bool("f", False) is False
    for bad in (0, 1, "true", None):
        with pytest.raises(ConfigError, match="allowed: true or false"):
            check_bool("f", bad)
    assert check_choice("f", "eval", ("eval", "train")) == "eval"
    with pytest.raises(ConfigError, match=r"^f: 'frozen'; allowed: 'eval', 'train'$"):
        check_choice("f", "frozen", ("eval", "train"))
    with pytest.raises(ConfigError):
        check_choice("f", True, (1, 2))  # True == 1, but a bool is not a choice among integers
