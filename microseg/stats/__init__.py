"""Statistics of comparisons, numbers in and numbers out: paired tests between two runs, the grid of an
experiment's replicates, the seed-aware differences of two losses, the rankings and the power of a
design. Its layer allows runs/ and below; it imports none of them (numpy, scipy and its own modules).
inference/ (its own layer) is independent of it."""
