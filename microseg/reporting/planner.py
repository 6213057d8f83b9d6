"""`microseg experiment power EXP --delta D`: how many seeds a planned experiment needs, from a pilot.

The pilot EXP is analysed as `compare` would (its completed grid, missing is worst); the variance
components of its primary metric's paired differences, pooled over its pairs
(`microseg.stats.power`), then stand for the planned experiment's. For each design --
the pilot's seeds, 2x and 4x them, or the `--seeds` given, each with the pilot's folds and
`--patients` test patients (default the pilot's) -- one line gives the power at `delta` and the
smallest difference detectable with 80% power; a last line gives the fewest seeds that reach 80%
at `delta`. The test is the report's, at alpha / m with m the pairs of `--losses` losses
(default the pilot's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from microseg.core.errors import MicrosegError
from microseg.reporting.experiment_analysis import analyse
from microseg.stats.paired import ALPHA
from microseg.stats.power import MAX_SEEDS, POWER, family_alpha, pooled_components, seeds_needed, simulate_test
from microseg.stats.replicates import metric


def power_lines(
    pilot: str | Path,
    delta: float,
    patients: int | None = None,
    seeds: Sequence[int] | None = None,
    losses: int | None = None,
) -> list[str]:
    """The planner's lines (see the module docstring); MicrosegError for a pilot without a pair of
    losses or an option out of range."""
    if not delta > 0:
        raise MicrosegError(f"--delta must be > 0, got {delta}")
    for name, value in (("--patients", patients), ("--losses", losses)):
        if value is not None and value < 2:
            raise MicrosegError(f"{name} must be at least 2, got {value}")
    if seeds is not None and min(seeds) < 1:
        raise MicrosegError(f"--seeds must be at least 1, got {min(seeds)}")
    analysis = analyse([Path(pilot)])
    m = metric(analysis.primary)
    components = pooled_components([d for d in analysis.differences if d.family == "primary"])
    if components is None:
        raise MicrosegError(
            f"{pilot} has one loss, or its losses' {m.short} differences have no variance at all (every score the "
            "same): the pilot needs two or more losses whose differences vary to plan from"
        )
    folds = analysis.design.folds
    n_patients = patients or len(analysis.patients)
    n_losses = losses or len(analysis.losses)
    alpha, pairs = family_alpha(n_losses, ALPHA)
    pilot_seeds = len(analysis.design.seeds)
    designs = list(seeds) if seeds else [pilot_seeds, 2 * pilot_seeds, 4 * pilot_seeds]
    sd_pat, sd_rep, sd_res = components.sds()
    lines = [
        f"pilot {pilot}: {len(analysis.losses)} losses x {pilot_seeds} seed(s)"
        + (f" x {folds} folds" if folds > 1 else "")
        + f" x {len(analysis.patients)} patients; {m.short} (primary) differences: patient sd {sd_pat:.4g}, "
        f"replicate sd {sd_rep:.4g}, residual sd {sd_res:.4g} (mean over {components.pairs} pair(s))",
        f"test: alpha {ALPHA} / {pairs} = {alpha:.4g} (Holm's first step over the {pairs} pair(s) of {n_losses} "
        f"losses), two-sided; {POWER:.0%} power",
    ]
    for n_seeds in designs:
        test = simulate_test(components, n_seeds * folds, n_patients, alpha)
        lines.append(
            f"{n_seeds} seed(s)" + (f" x {folds} folds" if folds > 1 else "") + f" x {n_patients} patients: "
            f"power {test.power(delta):.2f} at {delta:g}{m.unit or ' ' + m.short}; detects "
            f"{test.detectable():.4g}{m.unit or ' ' + m.short} with {POWER:.0%} power"
        )
    needed = seeds_needed(components, delta, folds, n_patients, alpha)
    unit = m.unit or " " + m.short
    lines.append(
        f"to resolve {delta:g}{unit} at {POWER:.0%} power with {n_patients} patients, run {needed} seeds"
        if needed is not None
        else f"no number of seeds up to {MAX_SEEDS} resolves {delta:g}{unit} at {POWER:.0%} power with "
        f"{n_patients} patients: plan more patients (--patients N)"
    )
    return lines
