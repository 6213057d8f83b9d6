"""Training without host synchronisation: a step reads nothing back from the device; the NaN/Inf
guard runs every --sync-every steps and at the epoch's end, and still stops with the last good
checkpoint; persistent loader workers keep a resumed run bit-equal to an uninterrupted one."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from microseg.cli import main
from microseg.core.errors import MicrosegError
from microseg.runs.config import resolve_train_config
from microseg.training.monitor import LossMonitor
from microseg.training.trainer import Trainer, train
from train_helpers import faulty_trainer, train_tiny, train_until_ctrl_c

# Python-level reads of a tensor's value, and the aten ops whose result size or value the host
# must wait for (item/bool/float go through _local_scalar_dense; nonzero, masked_select, boolean
# indexing and unique size their output from the data).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__format__")
SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::is_nonzero",
    "aten::equal",
    "aten::allclose",
    "aten::repeat_interleave",
}


class SyncCounter(TorchDispatchMode):
    """While active: every host read of a tensor (Python methods, torch.cuda.synchronize) and every
    data-dependent aten op, by name; `ops` is every aten op seen (to show the mode saw the step)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.active, self.syncs, self.ops = False, [], set()
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._counted("cuda.synchronize", torch.cuda.synchronize))

    def _counted(self, name, real):
        def method(*args, **kwargs):
            if self.active:
                self.syncs.append(name)
            return real(*args, **kwargs)

        return method

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.add(name)
        bool_index = name == "aten::index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in SYNCING_OPS or bool_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)


def read_history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_the_counter_sees_host_reads(monkeypatch):
    counter = SyncCounter(monkeypatch)
    x = torch.arange(4.0)
    with counter:
        x.sum().item(), bool(x.any()), x.tolist(), x[x > 1], float(x[0])
    assert {"item", "__bool__", "tolist", "__float__", "aten::_local_scalar_dense", "aten::index"} <= set(counter.syncs)


@pytest.mark.parametrize("loss", ["adaptive_focal", "ag_bce"])
def test_training_steps_issue_no_host_synchronisation(loss, cache, tmp_path, monkeypatch):
    counter, reads, steps = SyncCounter(monkeypatch), [], []
    real_advance, real_read = Trainer.advance, LossMonitor.read

    def counted_advance(self, batch):
        with counter:
            real_advance(self, batch)
        steps.append(self.step)

    def counted_read(self):
        reads.append(self.count)
        return real_read(self)

    monkeypatch.setattr(Trainer, "advance", counted_advance)
    monkeypatch.setattr(LossMonitor, "read", counted_read)
    # SGD, the reference optimizer (Adam keeps its step counts on the host by design)
    train_tiny(cache, tmp_path / "run", loss=loss, optimizer="sgd", epochs=1, val_fraction=0.0, sync_every=2)
    assert steps == [1, 2, 3, 4, 5]  # 18 training slices, batch 4
    assert counter.syncs == []
    assert {"aten::convolution_backward", "aten::native_layer_norm_backward"} <= counter.ops  # it saw backward
    assert reads == [2, 2, 1]  # every 2 steps, and the epoch's end


def test_nan_between_checks_stops_at_the_next_check_and_keeps_the_last_epoch(cache, tmp_path):
    trainer, seen = faulty_trainer(nan_at=8)  # epoch 2, step 3 of 5; checks after steps 2 and 4
    run = tmp_path / "nan"
    options = dict(cache=str(cache), run=str(run), model="tiny", epochs=3, batch_size=4, num_workers=0, sync_every=2)
    with pytest.raises(MicrosegError) as err:
        train(resolve_train_config(None, options), trainer=trainer)
    message = str(err.value)
    assert "\n" not in message
    assert "nan" in message and "epoch 2, step 3" in message and "steps 3-4" in message and "keeps epoch 1" in message
    assert seen["steps"] == 9  # stopped at the check after step 4, not at the epoch's end
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0) and len(read_history(run)) == 1


def test_ctrl_c_after_an_unchecked_nan_keeps_the_last_checkpoint(cache, tmp_path, capsys):
    trainer, _ = faulty_trainer(nan_at=7, ctrl_c_at=8)  # NaN at epoch 2, step 2; Ctrl-C before the check at step 4
    run = tmp_path / "nan_cut"
    with pytest.raises(KeyboardInterrupt):
        train_tiny(cache, run, trainer=trainer, epochs=3, val_fraction=0.0, sync_every=4)
    assert "not updated" in capsys.readouterr().out
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0)


def test_resume_with_persistent_workers_matches_uninterrupted_run(cache, tmp_path):
    full = train_tiny(cache, tmp_path / "full")  # in the main process (no workers)
    cut = tmp_path / "cut"
    train_until_ctrl_c(cache, cut, 5, num_workers=2, sync_every=2)  # epoch 2, second batch (3 batches of 4 per epoch)
    assert torch.load(cut / "last.pt", weights_only=True)["step"] == 1
    assert main(["train", "--run", str(cut), "--resume", "--num-workers", "2", "--sync-every", "3"]) == 0
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_history(full) == read_history(cut)
