"""--compile: the model and its loss traced as one graph, with no graph break and no recompile at
an epoch's smaller last batch (counted with the aot_eager backend, on the CPU)."""

from __future__ import annotations

from conftest import train_tiny


def test_compile_traces_model_and_loss_once_with_no_recompile_at_the_last_batch(cache, tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

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
