"""The model zoo: members by index, shards, the results table, kill-and-resume, shard merging."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_app.zoo import (
    ZooConfig,
    append_rows,
    checkpoint_epochs,
    load_config,
    member_spec,
    parse_shard,
    read_results,
    shard_members,
    shard_path,
)
from marginboost.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TINY = {"search": "grid", "space": {"width": [8, 16], "lr": [0.1, 0.05]}, "seeds": [0],
        "fixed": {"epochs": 2, "depth": 1, "batch_size": 32},
        "checkpoints": [0.5, 1.0], "data": {"name": "digits", "num_train": 120, "device_resident": True},
        "features": {"trace_probes": 2, "trace_batches": 1, "width_batches": 1, "measure_batch_size": 64}}


def test_grid_members_by_index_and_seeds():
    cfg = ZooConfig(space={"width": [16, 32], "lr": [0.1, 0.01], "dropout": [0.0, 0.5]}, seeds=[0, 5], seed=100)
    assert cfg.num_members == 16
    specs = [member_spec(cfg, i) for i in range(16)]
    assert [(s["width"], s["lr"], s["dropout"], s["seed"]) for s in specs[:5]] == [
        (16, 0.1, 0.0, 100), (16, 0.1, 0.0, 105), (16, 0.1, 0.5, 100), (16, 0.1, 0.5, 105), (16, 0.01, 0.0, 100)]
    assert specs[-1]["width"] == 32 and specs[-1]["seed"] == 105
    assert all(s["depth"] == 2 and s["epochs"] == 10 for s in specs)  # defaults
    with pytest.raises(ConfigError, match="member: 16"):
        member_spec(cfg, 16)


def test_random_members_depend_only_on_index():
    cfg = ZooConfig(search="random", members=50, seed=3,
                    space={"lr": {"log_uniform": [0.001, 0.1]}, "width": [8, 16, 32], "augment": [False, True]})
    a = [member_spec(cfg, i) for i in range(50)]
    assert all(0.001 <= s["lr"] <= 0.1 and s["width"] in (8, 16, 32) for s in a)
    assert len({s["lr"] for s in a}) == 50 and {s["augment"] for s in a} == {False, True}
    bigger = ZooConfig(search="random", members=80, seed=3, space=cfg.space)
    assert [member_spec(bigger, i) for i in range(50)] == a  # growing the zoo keeps its members
    assert [s["seed"] for s in a[:3]] == [3, 4, 5]


def test_shards_partition_the_zoo():
    cfg = ZooConfig(space={"width": list(range(7))})
    parts = [shard_members(cfg, (i, 3)) for i in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError, match="zoo.shard"):
            parse_shard(bad)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="zoo.space: 'height'"):
        ZooConfig(space={"height": [1]})
    with pytest.raises(ConfigError, match="zoo.checkpoints: 1.5"):
        ZooConfig(space={"width": [1]}, checkpoints=[0.5, 1.5])
    with pytest.raises(ConfigError, match="zoo.members"):
        ZooConfig(search="random", space={"width": [1]})
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"zoo": {**TINY, "typo": 1}}))
    with pytest.raises(ConfigError, match="zoo: 'typo'"):
        load_config(path)
    assert load_config("zoo_digits.yaml").num_members == 120  # the packaged config resolves by name
    assert checkpoint_epochs(8, [0.25, 0.5, 1.0]) == {0.25: 2, 0.5: 4, 1.0: 8}
    assert checkpoint_epochs(2, [0.25, 1.0]) == {0.25: 1, 1.0: 2}


def test_table_round_trips_exactly_and_merges_shards(tmp_path):
    rows = [{"member": m, "fraction": f, "x": 0.1 + m / 3, "flag": m % 2 == 0, "name": "mlp"}
            for m in (0, 2) for f in (0.5, 1.0)]
    append_rows(shard_path(tmp_path, (0, 2)), rows[:2])
    append_rows(shard_path(tmp_path, (0, 2)), rows[2:])
    append_rows(shard_path(tmp_path, (1, 2)), [{**rows[0], "member": 1, "x": 1 / 7}])
    merged = read_results(tmp_path)
    assert [(r["member"], r["fraction"]) for r in merged] == [(0, 0.5), (0, 1.0), (1, 0.5), (2, 0.5), (2, 1.0)]
    assert merged[0] == rows[0] and merged[2]["x"] == 1 / 7  # floats exact, types restored
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="differ"):
        append_rows(shard_path(tmp_path, (0, 2)), [{"member": 5}])


def _zoo(cfg_path, out, *extra, kill_after=None):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    script = [str(HERE / "zoo_killed.py")] if kill_after else ["-m", "lightning_app.zoo"]
    if kill_after:
        env["ZOO_KILL_AFTER"] = str(kill_after)
    return subprocess.Popen([sys.executable, *script, "--config", str(cfg_path), "--zoo.out_dir", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _table(out):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_results(out)]


@pytest.mark.slow
def test_killed_zoo_resumes_to_the_same_table_and_shards_merge_to_it(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"zoo": TINY}))
    procs = {"whole": _zoo(cfg_path, tmp_path / "whole"),
             "killed": _zoo(cfg_path, tmp_path / "killed", kill_after=2),
             "s0": _zoo(cfg_path, tmp_path / "sharded", "--zoo.shard", "0/2"),
             "s1": _zoo(cfg_path, tmp_path / "sharded", "--zoo.shard", "1/2")}
    results = {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    for name in ("whole", "s0", "s1"):
        assert results[name][0] == 0, results[name][2][-3000:]
    assert results["killed"][0] == 3, results["killed"][2][-3000:]
    whole = _table(tmp_path / "whole")
    assert len(whole) == 8 and {r["member"] for r in whole} == {0, 1, 2, 3}
    assert [r["epoch"] for r in whole[:2]] == [1, 2]
    assert all(r["gap"] == r["train_acc"] - r["test_acc"] for r in whole)
    assert {r["member"] for r in _table(tmp_path / "killed")} == {0, 1}
    resumed = _zoo(cfg_path, tmp_path / "killed")
    code, stdout = resumed.wait(timeout=600), resumed.stdout.read()
    assert code == 0, resumed.stderr.read()[-3000:]
    assert "2 to train" in stdout and "member 0 done" not in stdout  # finished members are not retrained
    assert _table(tmp_path / "killed") == whole
    assert len(list((tmp_path / "sharded").glob("results_shard*.csv"))) == 2
    assert _table(tmp_path / "sharded") == whole
