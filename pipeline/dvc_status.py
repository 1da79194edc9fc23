"""Which stages DVC considers up to date: the provenance Snakemake lacks for outputs DVC made.

Snakemake compares mtimes, and a per-stage params file it lists as an input says "these params
last changed at <mtime>". When that file is (re)written, the Snakefile asks DVC whether the
outputs on disk are the ones these params produced (`dvc status`: params, deps and outs all as
`dvc.lock` records them): then the file is dated 0 (not newer than the outputs); otherwise now,
so Snakemake reruns the stage. Without DVC (not installed, no repository) nothing is known to be
up to date, and the stage reruns: the safe side.
"""
from __future__ import annotations

import functools
import os
from typing import FrozenSet


@functools.lru_cache(maxsize=None)
def up_to_date_stages(root: str = ".") -> FrozenSet[str]:
    """Names of the stages of `root`'s dvc.yaml whose outputs match dvc.lock and current inputs."""
    try:
        from dvc.repo import Repo

        with Repo(os.fspath(root)) as repo:
            changed = repo.status()
            names = {stage.name for stage in repo.index.stages if stage.cmd}
    except Exception:  # no DVC repository, a broken lock, DVC missing: nothing is known current
        return frozenset()
    return frozenset(names - {key.split(":")[-1] for key in changed})
