"""Prediction with trained runs: a run's network as a slab predictor of native slices, the
ensemble of several runs, and `predict` (masks of NIfTI files).
Imports runs/ and below; stats/ (its own layer) is independent of it."""
