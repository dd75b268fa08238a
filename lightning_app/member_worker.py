"""The worker process that trains one member of a deep ensemble next to ``lightning fit``.

With ``boosting.concurrent_members: k > 1`` the orchestrator writes the run's resolved config
next to the run (``member_worker_config.yaml``) and starts this module for each round it does
not train itself::

    python -m lightning_app.member_worker --config RUN_DIR/member_worker_config.yaml --round 2 --threads 1

The worker builds the same CLI from that config (no progress bar, no model summary: its output
goes to ``round_<t>/worker.log``), trains member ``t`` exactly as the orchestrator would (same
seed, same ``round_<t>/checkpoints/last.ckpt`` resume), saves ``round_<t>/member.ckpt`` and then
``round_<t>/prefit.json``. The orchestrator scores and commits the member when its turn comes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from .cli import MarginBoostCLI, build_cli

CONFIG_FILE = "member_worker_config.yaml"
# console-only trainer fields (outside the run's fingerprint): the worker writes to a log file
QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")


class MemberWorkerCLI(MarginBoostCLI):
    """``lightning fit`` for one round: trains member ``worker_round`` and returns."""

    worker_round = 0

    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs):
        self.orchestrator.fit_in_worker(self.worker_round, self._member_model, self._member_trainer, datamodule)


def launcher(config_path: Path):
    """The orchestrator's ``member_launcher``: ``(t, threads, log) -> Popen`` of this module."""
    package_root = str(Path(__file__).resolve().parents[1])  # found even when run from a checkout

    def launch(t: int, threads: int, log: Path) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        with open(log, "w") as out:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "lightning_app.member_worker", "--config", str(config_path),
                                     "--round", str(t), "--threads", str(threads)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)

    return launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_app.member_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"the run's {CONFIG_FILE}")
    parser.add_argument("--round", type=int, required=True, help="the member to train (1..T)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    MemberWorkerCLI.worker_round = args.round
    build_cli(["fit", "--config", args.config, *QUIET], cli_class=MemberWorkerCLI)


if __name__ == "__main__":
    main()
