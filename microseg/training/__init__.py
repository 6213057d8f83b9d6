"""Training a run: the trainer (epochs, torchrun processes) and its hooks, one optimisation step,
the NaN / Inf loss monitor, the data loaders, validation, the Ctrl-C checkpoint and its restore,
and TensorBoard's live curves.
Imports inference/, stats/, runs/ and below; evaluation/ (its own layer) is independent of it."""
