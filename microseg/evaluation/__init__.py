"""Scoring a run on a dataset split: `evaluate` (per-patient and per-slice metrics, predictions) and the
analyses of where the errors are (hard region, size and roughness strata, disputed slices).
Imports inference/, stats/, runs/ and below; training/ (its own layer) is independent of it."""
