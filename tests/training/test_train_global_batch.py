"""The global batch: how the processes split each step's slices and weigh their losses, and the
options refused before any process waits on another (in one process, torchrun's environment set)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from cli_helpers import one_error, run_cli
from microseg.data.order import EpochSampler
from train_helpers import tiny_train_argv

SLICES, SEED, EPOCH, BATCH = 11, 7, 2, 4


def permutation() -> list[int]:
    """Epoch 2's order as torch's DistributedSampler draws it for one process."""
    sampler = DistributedSampler(range(SLICES), num_replicas=1, rank=0, shuffle=True, seed=SEED)
    sampler.set_epoch(EPOCH)
    return list(sampler)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_global_batch_is_split_over_the_processes(world):
    perm = permutation()
    batches = [perm[0:4], perm[4:8], perm[8:11]]  # 11 slices, global batch 4: 3 steps, the last of 3
    samplers = [EpochSampler(range(SLICES), world, rank, SEED, BATCH) for rank in range(world)]
    assert all(s.steps_per_epoch == 3 for s in samplers)
    for step, batch in enumerate(batches):
        shares = [s.share(s.order(EPOCH), step) for s in samplers]
        assert [i for i in sorted(sum(shares, [])) if i in batch] == sorted(batch)
        assert shares == [batch[r::world] if r < len(batch) else [perm[0]] for r in range(world)]
        weights = [s.weight(step) for s in samplers]
        real = [len(batch[r::world]) for r in range(world)]
        # DDP averages the processes' losses: weights n_r * W / L make that the mean over the batch's slices
        assert weights == pytest.approx([n * world / len(batch) for n in real])
        assert sum(weights) == pytest.approx(world)
    if BATCH % world == 0:  # equal shares: the loss as it is
        assert all(s.weight(0) == 1.0 for s in samplers)


def test_a_resumed_position_starts_at_its_step():
    sampler = EpochSampler(range(SLICES), 2, 1, SEED, BATCH)
    sampler.set_position(EPOCH, 1)
    perm = permutation()
    assert list(sampler) == [[(EPOCH, perm[5]), (EPOCH, perm[7])], [(EPOCH, perm[9])]]  # one list per step
    assert len(sampler) == 2


def test_global_batch_smaller_than_the_processes_is_refused(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(tiny_train_argv(cache, tmp_path / "r", "--batch-size", "2", "--device", "cpu"), capsys)
    one_error(code, err, "--batch-size 2 is the global batch", "3 processes")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option", [["--device", "cuda:1"], ["--sync-bn", "--device", "cpu"]])
def test_options_that_cannot_work_on_several_processes_are_refused(option, cache, tmp_path, monkeypatch, capsys):
    # --device cuda:N would put every process on GPU N; torch's SyncBatchNorm needs GPUs
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = run_cli(tiny_train_argv(cache, tmp_path / "r", *option), capsys)
    one_error(code, err, option[0])
    assert not (tmp_path / "r").exists()
