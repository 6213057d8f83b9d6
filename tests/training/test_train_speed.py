"""Training speed settings: --compile traces the model and its loss as one graph, with no graph break
and no recompile at an epoch's smaller last batch (counted on the CPU with the eager backend: the
graphs, breaks and guards are dynamo's whatever the backend); an epoch serialises its checkpoint once."""

from __future__ import annotations

import torch

from train_helpers import train_tiny


def test_compile_traces_model_and_loss_once_with_no_recompile_at_the_last_batch(cache, tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("eager")(gm, example_inputs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(model, backend=counting, **options))
    torch._dynamo.reset()
    counters.clear()
    # 12 training slices, global batch 5: batches of 5, 5 and 2
    train_tiny(cache, tmp_path / "compiled", compile=True, epochs=1, batch_size=5)
    assert len(graphs) == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    ops = {str(node.target) for node in graphs[0].graph.nodes}
    assert any("conv2d" in op for op in ops)  # the model ...
    assert any("binary_cross_entropy_with_logits" in op for op in ops)  # ... and the losses, in one graph
    torch._dynamo.reset()


def test_an_epoch_serialises_its_checkpoint_once(cache, tmp_path, monkeypatch):
    import filecmp

    import microseg.runs.checkpoint
    import microseg.training.trainer

    real_save, real_copy, saved, copies = torch.save, microseg.training.trainer.copy_file, [], []

    def save(obj, path, **options):
        saved.append(path)
        real_save(obj, path, **options)

    def copy(source, target):
        real_copy(source, target)
        copies.append(filecmp.cmp(source, target, shallow=False))

    monkeypatch.setattr(microseg.runs.checkpoint.torch, "save", save)
    monkeypatch.setattr(microseg.training.trainer, "copy_file", copy)
    run = train_tiny(cache, tmp_path / "run", epochs=2)  # a validation split: best.pt when val_dsc improves
    assert len(saved) == 2  # last.pt of each epoch, and nothing else serialised
    assert copies and all(copies)  # best.pt: the bytes of that epoch's last.pt
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] >= 1
