"""The pipeline's own params sections are typed: a bad value or an unknown key stops the stage
with the full dotted key, the value and what is allowed, also when `dvc exp run -S` wrote it."""
import ast
import inspect
import random
import secrets
import shutil
from pathlib import Path

import pytest

from codetr.data.synthetic import generate
from pipeline import backbone, prepare, report
from pipeline.param_schema import SCHEMAS, ParamsError
from pipeline.params import load_params, section

REPO = Path(__file__).resolve().parents[1]
PIPELINE_SECTIONS = tuple(SCHEMAS)


def _word() -> str:
    """A fresh string that no YAML loader or Hydra reads as a number, boolean or null."""
    return "x" + secrets.token_hex(3)


def _yaml12_string_bool() -> str:
    """A word YAML 1.1 reads as a boolean and YAML 1.2 (DVC, the pipeline) as a string."""
    word = random.choice(["yes", "no", "on", "off", "y", "n"])
    return random.choice([word, word.upper(), word.capitalize()])


def _mappings(keys, where):
    yield where, keys
    for name, key in keys.items():
        if key.keys is not None:
            yield from _mappings(key.keys, f"{where}.{name}")


def _nested(dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    data = {leaf: value}
    for part in reversed(parents):
        data = {part: data}
    return data


@pytest.mark.parametrize("path", ["params.yaml", *sorted(p.relative_to(REPO).as_posix()
                                                          for p in (REPO / "params").glob("*.yaml"))])
def test_the_repository_params_files_load_clean(path):
    params = load_params(REPO / path)
    for name in PIPELINE_SECTIONS:
        section(params, name)


def test_every_argument_of_the_synthetic_generator_is_a_key():
    wanted = set(inspect.signature(generate).parameters) - {"out_dir"}
    assert set(SCHEMAS["prepare"]["synthetic"].keys) == wanted


# The names each stage module gives its params sections (and their sub-mappings); functions
# whose same-named variable holds something else (a COCO file) are skipped.
RECEIVERS = {prepare: {"params", "syn", "coco", "cut", "src"}, backbone: {"section"}, report: {"opts"}}
NOT_PARAMS_FUNCTIONS = {"_remap_contiguous"}


def _keys_read(module) -> set:
    names, read = RECEIVERS[module], set()
    for func in ast.parse(Path(module.__file__).read_text()).body:
        if not isinstance(func, ast.FunctionDef) or func.name in NOT_PARAMS_FUNCTIONS:
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names
                    and node.args and isinstance(node.args[0], ast.Constant)):
                read.add(node.args[0].value)
            elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                  and node.value.id in names and isinstance(node.slice, ast.Constant)):
                read.add(node.slice.value)
    return read


@pytest.mark.parametrize("module", list(RECEIVERS), ids=lambda m: m.__name__)
def test_every_key_a_stage_reads_is_known(module):
    """A key a stage reads but the schema lacks would be refused as unknown: there is none."""
    name = module.__name__.split(".")[-1]
    known = {key for _, keys in _mappings(SCHEMAS[name], name) for key in keys}
    read = _keys_read(module)
    assert len(read) >= 3 and read <= known, sorted(read - known)


BAD_VALUES = [  # (dotted key, a fresh bad value, words the message must hold)
    ("prepare.contiguous_ids", _yaml12_string_bool, "expected true or false"),
    ("prepare.contiguous_ids", lambda: random.randint(0, 9), "expected true or false"),
    ("prepare.source", _word, "Allowed values: synthetic, coco"),
    ("prepare.synthetic.num_train", _word, "expected an integer"),
    ("prepare.synthetic.num_val", lambda: random.randint(1, 40) + 0.5, "expected an integer"),
    ("prepare.synthetic.empty_prob", _word, "expected a number"),
    ("prepare.synthetic.classes", _word, "expected a list of strings"),
    ("prepare.coco.images", _word, "Allowed values: symlink, copy, none"),
    ("prepare.coco.split.seed", lambda: random.randint(1, 9) + 0.25, "expected an integer"),
    ("backbone.timeout", _word, "expected a number"),
    ("backbone.timeout", lambda: -random.uniform(0.5, 100), "must be > 0"),
    ("backbone.timeout", lambda: float("nan"), "expected a finite number"),
    ("backbone.sha256", lambda: random.randint(1, 10**6), "expected a string or null"),
    ("report.max_images", _word, "expected an integer"),
    ("report.max_images", lambda: random.randint(1, 40) + 0.5, "expected an integer"),
    ("report.columns", lambda: -random.randint(0, 5), "must be >= 1"),
    ("report.title", lambda: [_word()], "expected a string"),
]


@pytest.mark.parametrize("dotted,make,words", BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_VALUES)])
def test_a_bad_value_names_the_key_the_value_and_the_type(dotted, make, words):
    value = make()
    with pytest.raises(ParamsError) as caught:
        section(_nested(dotted, value), dotted.split(".")[0])
    message = str(caught.value)
    assert message.startswith(f"{dotted}={value!r}") and words in message, message


def test_an_unknown_key_gets_a_did_you_mean_and_the_allowed_keys():
    for name, schema in SCHEMAS.items():
        for where, keys in _mappings(schema, name):
            key = random.choice([k for k in keys if len(k) >= 5] or [None])
            if key is None:
                continue
            i = random.randrange(1, len(key))
            typo = key[:i] + key[i + 1:] if random.random() < 0.5 else key + random.choice("sxz")
            with pytest.raises(ParamsError) as caught:
                section(_nested(f"{where}.{typo}", 1), name)
            message = str(caught.value)
            assert f"unknown key '{where}.{typo}'" in message, message
            assert f"Did you mean '{where}.{key}'?" in message, message
            assert f"Allowed keys of {where}: {', '.join(keys)}" in message, message


def test_sections_without_a_schema_are_left_to_the_spec_loader():
    anything = {_word(): _word()}
    assert section({"model": anything}, "model") == anything


# What `dvc exp run -S key=value` does before it runs the stages: DVC's own params writer (Hydra's
# override grammar, the YAML 1.2 dump), then the stage command reads the file.
def _dvc_set(params: Path, *overrides: str) -> None:
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(params), list(overrides))


def _stage_main(stage: str, params: Path, tmp: Path) -> int:
    out = tmp / "out"
    if stage == "prepare":
        return prepare.main(["--params", str(params), "--out", str(out), "--check-spec"])
    if stage == "backbone":
        return backbone.main(["--params", str(params), "--out", str(out)])
    return report.main(["--params", str(params), "--data", str(tmp / "d"), "--train", str(tmp / "t"),
                        "--evaluate", str(tmp / "e"), "--inference", str(tmp / "i"), "--out", str(out)])


SET_PARAMS = [  # (override DVC writes, the key the stage must name, words)
    (lambda: f"prepare.contiguous_ids={_yaml12_string_bool()}", "prepare.contiguous_ids",
     "expected true or false"),
    (lambda: f"prepare.synthetic.num_train={_word()}", "prepare.synthetic.num_train", "expected an integer"),
    (lambda: f"+prepare.contiguos_ids={random.choice(['true', 'false'])}", "prepare.contiguos_ids",
     "Did you mean 'prepare.contiguous_ids'?"),
    (lambda: f"backbone.timeout={_word()}", "backbone.timeout", "expected a number"),
    (lambda: f"+backbone.sha265={secrets.token_hex(32)}", "backbone.sha265",
     "Did you mean 'backbone.sha256'?"),
    (lambda: f"report.max_images={random.randint(1, 40) + 0.5}", "report.max_images", "expected an integer"),
    (lambda: f"+report.titel={_word()}", "report.titel", "Did you mean 'report.title'?"),
]


@pytest.mark.parametrize("override,dotted,words", SET_PARAMS, ids=[k for _, k, _ in SET_PARAMS])
def test_dvc_exp_run_set_param_errors_name_the_key(override, dotted, words, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    text = override()
    _dvc_set(params, text)
    stage = dotted.split(".")[0]
    assert _stage_main(stage, params, tmp_path) == 1, text
    err = capsys.readouterr().err
    assert f"{stage}: error:" in err and dotted in err and words in err, (text, err)
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # refused before any work


def test_dvc_itself_refuses_a_new_key_without_plus(tmp_path):
    from dvc.exceptions import InvalidArgumentError

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    key = random.choice(["backbone.sha265", "report.titel", "prepare.contiguos_ids"])
    with pytest.raises(InvalidArgumentError) as caught:
        _dvc_set(params, f"{key}={_word()}")
    assert key in str(caught.value.__cause__)
    assert params.read_text() == (REPO / "params.yaml").read_text()
