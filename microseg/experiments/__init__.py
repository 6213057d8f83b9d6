"""Experiments: losses x seeds x folds as one plan, its patient splits and cells (each an ordinary run),
and running them: one cell, the runner, and the local and SLURM executors.
Imports training/, evaluation/ and every layer below."""
