"""`microseg demo`: the whole pipeline on a small phantom set, on a laptop CPU, in minutes.

simulate (16 train + 8 test patients) -> prepare (slice cache) -> train the `small` model with
adaptive_focal, ag_bce and focal -> evaluate each on the test split -> compare, with overlays.
Everything goes under one folder (default ./demo); the report is `<out>/report/report.md`, and the
demo ends by printing its results paragraph (`microseg.report.results_paragraph`).
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_LOSSES = ("adaptive_focal", "ag_bce", "focal")
DEMO_DATA = dict(n_train=16, n_test=8, n_slices=18, size=(240, 343), seed=0)
# Short CPU schedule, tuned on 2 cores for the whole demo to fit in 5 minutes: optimiser steps are
# the budget. No augmentation (as MicroSegNet's trainer); batch 4 at 80 px (the 80 px round trip
# still keeps volume DSC 0.992 of the expert mask) buys ~1.3x the steps per second of 96 px;
# 18 slices per patient and no validation split (last.pt is evaluated) put all 16 training
# patients in every epoch, which helps more than more slices of fewer patients; Adam lr 3e-3
# with poly decay converges within 8 epochs. On 2 cores, loader workers would only compete.
DEMO_TRAIN = dict(model="small", epochs=8, batch_size=4, optimizer="adam", lr=3e-3, val_fraction=0.0, seed=1234,
                  augment=False, num_workers=0)
DEMO_SIZE = 80


def run_demo(out: str | Path = "demo", epochs: int | None = None) -> Path:
    """Run the demo into `out`; returns the report path. Re-running overwrites the demo's runs."""
    from microseg.config import resolve_train_config
    from microseg.data.cache import prepare_cache
    from microseg.data.phantom import simulate_dataset
    from microseg.evaluate import evaluate
    from microseg.report import compare, results_paragraph
    from microseg.run import load_run
    from microseg.train import train

    out = Path(out)
    started = time.perf_counter()
    data = simulate_dataset(out / "data", preview=True, **DEMO_DATA)
    cache = prepare_cache(data, out / "cache.h5", size=DEMO_SIZE)
    runs = []
    for loss in DEMO_LOSSES:
        run = out / "runs" / loss
        options = dict(DEMO_TRAIN, cache=str(cache), run=str(run), loss=loss)
        if epochs is not None:
            options["epochs"] = epochs
        print(f"\n== training {loss} ==", flush=True)
        train(resolve_train_config(None, options), force=True)
        evaluate(run, data)
        runs.append(run)
    report = compare(runs, out / "report", overlays=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; report: {report}")
    print("\n" + results_paragraph([load_run(run) for run in runs]))
    return report
