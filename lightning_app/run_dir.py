"""The files of a boosting run directory: durable writes, checked reads, the resume fingerprint.

A run directory holds (rounds numbered ``1..T``)::

    state.pt                 the resumable state; written last in a round: the commit point
    summary.json             per-round records, rewritten from state.pt (repaired on every start)
    round_<t>/member.ckpt    member t
    round_<t>/margins.pt     M, gaps, member t's and the ensemble's margins after round t
    round_<t>/checkpoints/last.ckpt   Lightning's last checkpoint while round t trains
    ensemble/                the ensemble's logger output (step = round), logged_round.json,
                             figure_limits.json (lightning_app.ensemble_logging)

Every file is written to ``<name>.tmp``, flushed, fsync'ed and renamed, then the directory is
fsync'ed, so a crash leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from marginboost.errors import ConfigError

STATE_FILE = "state.pt"
SUMMARY_FILE = "summary.json"
MEMBER_FILE = "member.ckpt"


def round_dir(run_dir: str | Path, t: int) -> Path:
    """``run_dir/round_<t>`` for round ``t`` in ``1..T``."""
    return Path(run_dir) / f"round_{t}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` (JSON for ``*.json``, else ``torch.save``) durably: tmp, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".json":
            f.write(json.dumps(obj, indent=2).encode())
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_run_dir(run_dir: str | Path, field: str = "boosting.run_dir") -> Path:
    """``run_dir`` as a writable directory (created if missing), or a ``ConfigError``.

    Tried for real (create the directory, write and remove a probe file) rather than by
    permission bits, which do not apply to every user or file system.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, str(run_dir), "a directory (this path is a file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"  # one per process: DDP ranks check at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(field, str(run_dir),
                          f"a writable directory ({type(err).__name__}: {err.strerror or err})") from err
    return path


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/state.pt``, or a ``ConfigError`` that names the file and the way out."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError("boosting.run_dir", str(run_dir),
                          f"a directory holding a trained run ({STATE_FILE}); run `lightning fit` with "
                          "this config first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, overwritten, or not a torch file at all
        raise ConfigError(str(path), f"unreadable ({type(err).__name__}: {str(err)[:120]})",
                          "the state.pt of a boosting run; restore it from a backup, or start a new run "
                          "in another boosting.run_dir (the member checkpoints round_<t>/member.ckpt "
                          "stay usable)", describe=True) from err
    if not isinstance(state, dict) or "rounds_done" not in state:
        raise ConfigError(str(path), "not a boosting state", "the state.pt of a boosting run; start a new "
                          "run in another boosting.run_dir", describe=True)
    return state


def member_paths(run_dir: str | Path, state: Mapping[str, Any]) -> list[Path]:
    """The member checkpoints of the completed rounds; a missing one is a ``ConfigError``."""
    run_dir = Path(run_dir)
    paths = []
    for member in state["members"]:
        path = Path(member["checkpoint"])
        if not path.is_absolute():
            path = run_dir / path
        if not path.is_file():
            raise ConfigError(str(path), "missing", f"the checkpoint of member {member['round']}; restore the "
                              f"file, or start a new run in another boosting.run_dir", describe=True)
        paths.append(path)
    return paths


def _plain(value: Any) -> Any:
    """A JSON-able form of a config value; callables and classes by import path (no addresses)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return repr(value)


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """``{dotted.field: json text}`` of a (nested) config; leaves are compared as text."""
    plain = _plain(config)
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        else:
            out[key] = json.dumps(node, sort_keys=True)

    walk(plain, prefix)
    return out


def fingerprint_differences(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """``field: old -> new`` for every field that differs (``<unset>`` where one side lacks it)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            lines.append(f"{key}: {a} -> {b}")
    return lines
