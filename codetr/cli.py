"""`codetr train|evaluate|inference|export|gen_trt_engine|import_mmdet|spec -e SPEC [key=value ...]`.

Exit status: 0 success, 2 usage or spec error (a message, no traceback), 1 runtime failure.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from codetr.errors import UserError
from codetr.spec import load_spec, spec_to_yaml

TASKS = {
    "train": "Train a Co-DETR model; checkpoints go to <results_dir>/train.",
    "evaluate": "COCO evaluation of evaluate.checkpoint on dataset.test_data_sources.",
    "inference": "KITTI labels and annotated images for dataset.infer_data_sources.",
    "export": "ONNX file of export.checkpoint (onnxruntime parity checked), for deployment.",
    "gen_trt_engine": "TensorRT engine of gen_trt_engine.onnx_file (needs CUDA and tensorrt).",
    "import_mmdet": "Write the official mmdet checkpoint import_mmdet.checkpoint in codetr's format.",
}

_EPILOG = """overrides: key=value pairs applied to the spec, Hydra style, e.g.
  results_dir=/tmp/run train.optim.lr=1e-4 model.return_interm_indices=[1,2,3]"""


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits with 2 itself; keep one code path
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="codetr", description="Co-DETR (Co-DINO) object detection.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"codetr {importlib.import_module('codetr').__version__}")
    sub = parser.add_subparsers(dest="task", metavar="{" + ",".join([*TASKS, "spec"]) + "}", parser_class=_Parser)
    for name, help_text in TASKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-e", "--experiment_spec_file", required=True, help="the experiment spec (YAML)")
        p.add_argument("overrides", nargs="*", help="key=value spec overrides")
    p = sub.add_parser("spec", help="print the resolved spec (defaults when no -e) as YAML",
                       description="Print the resolved spec as YAML.", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--experiment_spec_file", default=None, help="the experiment spec (YAML)")
    p.add_argument("overrides", nargs="*", help="key=value spec overrides")
    return parser


def _setup_logging() -> None:
    """codetr's own messages to stderr, once; Lightning keeps its own handler (no duplicates)."""
    log = logging.getLogger("codetr")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_logging()
    try:
        args = build_parser().parse_args(argv)
        if args.task is None:
            raise UsageError(f"codetr: choose a task: {', '.join(TASKS)} or spec (see --help)")
        # `~key` (Hydra's delete) resets a key to its default; everything else is key=value.
        bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
        if bad:
            raise UsageError(f"codetr {args.task}: expected key=value overrides, got: {' '.join(bad)}")
        spec = load_spec(args.experiment_spec_file, args.overrides)
        if args.task == "spec":
            sys.stdout.write(spec_to_yaml(spec))
            return 0
        task = importlib.import_module(f"codetr.tasks.{args.task}")
        return int(task.run(spec) or 0)
    except (UsageError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the runtime failure path: message + traceback
        logging.getLogger("codetr").exception("codetr %s failed: %s",
                                              getattr(locals().get("args"), "task", "?"), err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
