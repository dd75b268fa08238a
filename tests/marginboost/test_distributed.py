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
