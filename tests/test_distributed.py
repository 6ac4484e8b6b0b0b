"""vocabseg.distributed outside torchrun: rank 0 of 1, every collective a no-op (the collectives themselves run in
test_eval's torchrun evaluation and test_maft_train's two-process gradients)."""

import torch

from vocabseg.distributed import DistInfo, all_reduce, barrier, distributed_device, init_distributed, teardown


def test_a_plain_run_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.is_distributed and info.backend is None
    assert distributed_device("cuda:1") == "cuda:1" and distributed_device(None) is None
    assert not torch.distributed.is_initialized()


def test_collectives_leave_a_single_process_untouched():
    info = DistInfo()
    values = torch.arange(4)
    assert all_reduce(values, info) is values and values.tolist() == [0, 1, 2, 3]
    barrier(info)
    teardown(info)
    assert not torch.distributed.is_initialized()
