"""What `compare` and `experiment power` write: compare's choice of report, the report of several runs,
the analysis and report of an experiment, the one writer and the sections both reports share, the
seeds a planned experiment needs, paired comparisons of runs, and every figure.
Imports experiments/ and every layer below."""
