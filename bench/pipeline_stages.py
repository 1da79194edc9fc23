"""Wall time and peak memory (RSS) of each pipeline stage, as `make repro` runs them.

Runs `dvc repro --single-item --force <stage>` for every stage of dvc.yaml in order, each under
GNU time, and prints a markdown table (wall s, peak RSS MiB of the stage's largest process).

    .venv/bin/python bench/pipeline_stages.py            # in a repository where the pipeline can run
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages import read_stages  # noqa: E402


def run_stage(dvc: str, name: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one stage."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", out.name, dvc, "repro", "--single-item",
                        "--force", name], check=True)
        wall, rss_kib = re.findall(r"([\d.]+) (\d+)", out.read())[-1]
    return float(wall), int(rss_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dvc", default=str(Path(sys.executable).with_name("dvc")))
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    rows = [(stage.name, *run_stage(args.dvc, stage.name)) for stage in read_stages("dvc.yaml")]
    print("| stage | wall s | peak RSS MiB |\n| --- | ---: | ---: |")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.0f} |")
    print(f"| all | {sum(r[1] for r in rows):.1f} | {max(r[2] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
