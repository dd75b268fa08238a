import json
import os

import pytest
import torch

from lightning_app.run_dir import (
    check_run_dir,
    fingerprint_differences,
    flatten_config,
    load_state,
    member_paths,
    save_atomic,
)
from marginboost.errors import ConfigError


def test_save_atomic_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_atomic({"a": torch.arange(3)}, tmp_path / "state.pt")
    save_atomic({"b": 1}, tmp_path / "summary.json")
    # file data synced, then renamed, then the directory entry synced
    assert events == ["fsync", "replace", "fsync"] * 2
    assert torch.equal(torch.load(tmp_path / "state.pt")["a"], torch.arange(3))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"b": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_run_dir_must_be_a_writable_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="boosting.run_dir: '.*file'; allowed: a directory"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="boosting.run_dir: '/proc/marginboost_run'; allowed: a writable"):
        check_run_dir("/proc/marginboost_run")  # not creatable, even by root
    assert check_run_dir(tmp_path / "a" / "b").is_dir()


def test_corrupt_or_missing_files_name_the_file_and_the_way_out(tmp_path):
    with pytest.raises(ConfigError, match="holding a trained run"):
        load_state(tmp_path)
    save_atomic({"rounds_done": 1, "members": [{"round": 1, "checkpoint": "round_1/member.ckpt"}]},
                tmp_path / "state.pt")
    raw = (tmp_path / "state.pt").read_bytes()
    state = load_state(tmp_path)
    with pytest.raises(ConfigError, match=r"round_1/member.ckpt: missing; allowed: the checkpoint of member 1"):
        member_paths(tmp_path, state)
    (tmp_path / "state.pt").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ConfigError, match=r"state.pt: unreadable .*another boosting.run_dir"):
        load_state(tmp_path)


def test_flatten_and_differences():
    def opt(params):
        return params

    flat = flatten_config({"model": {"lr": 0.1, "optimizer": opt, "sizes": [1, 2]}, "empty": {}})
    assert flat == {"model.lr": "0.1", "model.optimizer": json.dumps(f"{__name__}.{opt.__qualname__}"),
                    "model.sizes": "[1, 2]", "empty": "{}"}
    diff = fingerprint_differences({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"})
    assert diff == ["b: 2 -> 3", "c: <unset> -> 4"]
