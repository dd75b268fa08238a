"""gather_by_index and the device of collectives."""
import torch
import torch.distributed as dist

from marginboost import comm_device, gather_by_index


def test_gather_keeps_first_occurrence_of_padding_duplicates():
    # a padded shard repeats object 0; the copies may differ in the last bits
    values = torch.tensor([1.0, 2.0, 3.0, 1.0000001])
    idx = torch.tensor([0, 1, 2, 0])
    assert torch.equal(gather_by_index(values, idx, 3), torch.tensor([1.0, 2.0, 3.0]))
    # the first occurrence wins, wherever the other copy sits
    assert torch.equal(gather_by_index(values.flip(0), idx.flip(0), 3), torch.tensor([1.0000001, 2.0, 3.0]))


def test_collectives_use_the_gpu_under_nccl(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert comm_device() == torch.device("cpu")


_EXIT_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
# registered before marginboost: atexit runs last-in first-out, so this runs after its handler
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
if sys.argv[1] == "with":
    import marginboost  # noqa: F401
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
"""


def test_importing_marginboost_destroys_a_gloo_group_before_interpreter_exit(tmp_path):
    # gloo groups left to interpreter finalization can abort the process (exit status -6)
    import os
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(mode: str) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, mode, port], cwd=root, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert run("without") == "initialized at exit: True"
    assert run("with") == "initialized at exit: False"
