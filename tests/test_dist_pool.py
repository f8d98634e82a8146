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


def _bn_average() -> list[float]:
    import torch
    import torch.distributed as dist

    from parallel.distributed import average_buffers

    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(dist.get_rank()))  # rank 0: 0, rank 1: 1
    bn.running_var.fill_(1.0 + 2 * dist.get_rank())
    average_buffers(bn)
    return bn.running_mean.tolist() + bn.running_var.tolist() + [float(bn.num_batches_tracked)]


def test_batch_norm_statistics_are_averaged_over_ranks(dist_pool) -> None:
    a, b = dist_pool.run(_bn_average)
    assert a == b == [0.5, 0.5, 0.5, 2.0, 2.0, 2.0, 0.0]
