"""Training a run: the trainer (epochs, validation, checkpoints, torchrun processes), one
optimisation step, the NaN / Inf loss monitor, and TensorBoard's live curves.
Imports inference/, stats/, runs/ and below; evaluation/ (its own layer) is independent of it."""
