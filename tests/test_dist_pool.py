import torch
import torch.distributed as dist


def _allreduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return float(t.item())


def _raise_on_rank1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return dist.get_rank()


def test_pool_runs_collectives(dist_pool):
    assert dist_pool.run(_allreduce_rank) == [3.0, 3.0]


def test_pool_reports_errors_and_recovers(dist_pool):
    import pytest

    with pytest.raises(RuntimeError, match="boom on rank 1"):
        dist_pool.run(_raise_on_rank1)
    assert dist_pool.run(_allreduce_rank) == [3.0, 3.0]
