"""What `compare` and `experiment power` write: the report of several runs, the analysis and report of
an experiment, the seeds a planned experiment needs, paired comparisons of runs, and every figure.
Imports experiments/ and every layer below."""
