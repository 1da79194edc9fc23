"""Where a pipeline run came from: the git commit, the params file's hash, the runner and the
stage commands, for the report (so a report read later says what produced it)."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Dict, List

from pipeline.params import load_params
from pipeline.stages import read_stages


def _git(args: List[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def runner() -> str:
    """'dvc exp run (NAME)', 'dvc repro', 'snakemake' or 'run directly', from the environment
    DVC gives stage commands (`DVC_STAGE`, `DVC_EXP_NAME`) or the parent processes' names."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"dvc exp run ({os.environ['DVC_EXP_NAME']})"
    if os.environ.get("DVC_STAGE"):
        return "dvc repro"
    try:
        import psutil

        for parent in psutil.Process().parents():
            if any("snakemake" in part for part in parent.cmdline()[:3]):
                return "snakemake"
    except Exception:  # noqa: BLE001 - psutil missing or a process gone: unknown is fine
        pass
    return "run directly"


def provenance(params_file: str | os.PathLike, dvc_yaml: str | os.PathLike = "dvc.yaml") -> Dict[str, str]:
    """{commit, params_sha256, runner, train_command}: git commit (with '+changes' when the
    tracked code differs from it), the first 12 hex of the params file's SHA-256, the runner and
    the train stage's command."""
    params_file = Path(params_file)
    root = params_file.resolve().parent
    commit = _git(["rev-parse", "--short=12", "HEAD"], root) or "not a git checkout"
    if commit != "not a git checkout" and _git(["status", "--porcelain", "--untracked-files=no"], root):
        commit += " +changes"
    digest = hashlib.sha256(params_file.read_bytes()).hexdigest()[:12]
    stages = {}
    if Path(dvc_yaml).is_file():
        try:  # the commands only; `${...}` deps are taken from the params file reported on
            stages = {s.name: s.cmd for s in read_stages(dvc_yaml, load_params(params_file))}
        except (ValueError, KeyError):
            stages = {}
    return {"commit": commit, "params_sha256": digest, "runner": runner(),
            "train_command": stages.get("train", "codetr train -e params.yaml")}
