"""``prepare``: the dataset check, then the HDF5 slice cache, reading each training volume once.

The cache (``microseg.data.cache``) is rebuilt only when its fingerprint (the format version, the
size, each source file's path, byte size and mtime) differs from the sources'. Before the build,
the dataset check (``microseg.data.check``) runs on the test split and then on each training case as it
is read (one read per volume): its first error stops the build with one line, its warnings (e.g.
a mask empty on every slice) get a line each, and the report is written beside the cache as
``<cache>.check.json``. A progress bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import functools
from pathlib import Path

from microseg.core.atomic import remove_stale_temporaries, require_writable
from microseg.core.errors import OptionError
from microseg.core.parallel import resolve_jobs
from microseg.core.preprocess import SIZE_MULTIPLE
from microseg.data.cache import cache_entry, cached_fingerprint, fingerprint, source_records, test_record, write_cache
from microseg.data.check import checked_train_cases, dataset_work
from microseg.data.layout import find_cases


def prepare_cache(data_root: str | Path, out: str | Path, size: int = 224, jobs: int | None = 1) -> Path:
    """Build (or reuse, when up to date) the slice cache of ``data_root`` at ``out``; returns ``out``.

    `jobs` patients are read, checked and resized at once, one per process (`microseg.core.parallel`);
    this process writes them in order, so the cache is the same whatever `jobs` is (None: the
    default, `microseg.core.parallel.resolve_jobs`).
    """
    if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise OptionError(
            f"`size` must be a positive multiple of {SIZE_MULTIPLE}, the models' patch stride (got {size})"
        )
    root, out = Path(data_root).resolve(), Path(out)
    jobs = resolve_jobs(jobs, "prepare", work=lambda: dataset_work(root, ["train"]))
    require_writable(out)
    train = find_cases(root, "train")
    test = find_cases(root, "test") if (root / "test").exists() else []
    digest = fingerprint(train + test, size)
    remove_stale_temporaries(out)
    if cached_fingerprint(out) == digest:
        print(f"cache up to date: {out}")
        return out
    records = {case.case_id: test_record(case) for case in test}
    convert = functools.partial(cache_entry, size=size)
    entries = checked_train_cases(root, out, digest, train, test, convert, jobs)  # + <cache>.check.json
    n_slices = write_cache(out, size, digest, root, entries, records, source_records(train + test))
    print(f"wrote cache: {out} ({n_slices} slices from {len(train)} patients, {len(test)} test cases)")
    return out
