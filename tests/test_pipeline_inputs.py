"""The pipeline notices changes of what it does not produce: the user's data (`prepare.inputs`)
and, for Snakemake, params changed behind its back (`pipeline.dvc_status`)."""
import json
import os
import re
import time
from pathlib import Path

import pytest

from codetr.data.synthetic import generate
from codetr.spec.yaml_io import dump_yaml
from pipeline.dvc_status import up_to_date_stages
from pipeline.params import load_params
from pipeline.prepare import PrepareError, run
from pipeline.stages import read_stages, write_if_changed
from test_pipeline_dag import REPO, copy_repo, run_tool, tool_env


def test_the_inputs_dep_is_the_params_folder(tmp_path):
    prepare = next(s for s in read_stages(REPO / "dvc.yaml") if s.name == "prepare")
    assert load_params(REPO / "params.yaml")["prepare"]["inputs"] in prepare.deps
    other = read_stages(REPO / "dvc.yaml", {"prepare": {"inputs": "/data/mine"}})
    assert "/data/mine" in next(s for s in other if s.name == "prepare").deps
    with pytest.raises(ValueError, match=r"\$\{prepare.inputs\} must be a string or number"):
        read_stages(REPO / "dvc.yaml", {"prepare": {"inputs": ["a", "b"]}})


def test_coco_files_outside_the_inputs_folder_are_refused(tmp_path):
    generate(tmp_path / "mine", 3, 2, 0, image_size=64, seed=4)
    coco = {s: {"json_file": str(tmp_path / "mine" / s / "annotations.json"),
                "image_dir": str(tmp_path / "mine" / s / "images")} for s in ("train", "val")}
    with pytest.raises(PrepareError, match=r"prepare.coco.train.json_file=.* lies outside prepare.inputs"):
        run({"source": "coco", "inputs": str(tmp_path / "elsewhere"), "coco": coco}, tmp_path / "d1")
    # the JSON under inputs, the images elsewhere: refused when prepare copies the images, fine
    # when they stay in place (images: none), where prepare reads no image content
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train.json").write_text(Path(coco["train"]["json_file"]).read_text())
    split = {"json_file": str(tmp_path / "ann" / "train.json"), "image_dir": coco["train"]["image_dir"]}
    with pytest.raises(PrepareError, match="prepare.coco.train.image_dir=.* lies outside"):
        run({"source": "coco", "inputs": str(tmp_path / "ann"), "coco": {"images": "copy", "train": split}},
            tmp_path / "d2")
    run({"source": "coco", "inputs": str(tmp_path / "ann"), "coco": {"images": "none", "train": split}},
        tmp_path / "d4")
    stats = run({"source": "coco", "inputs": str(tmp_path / "mine"), "coco": coco}, tmp_path / "d3")
    assert stats["splits"]["train"]["images"] == 3
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_a_link_inside_inputs_and_a_missing_key_are_named(tmp_path):
    """DVC and Snakemake do not follow a symlink inside a dependency folder: refused with the fix.
    A params file without `prepare.inputs` gets an error saying what to add."""
    generate(tmp_path / "real", 2, 0, 0, image_size=64, seed=5)
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "mine").symlink_to(tmp_path / "real", target_is_directory=True)
    train = {"json_file": str(tmp_path / "inputs/mine/train/annotations.json"),
             "image_dir": str(tmp_path / "inputs/mine/train/images")}
    with pytest.raises(PrepareError, match="symbolic link inside prepare.inputs"):
        run({"source": "coco", "inputs": str(tmp_path / "inputs"), "coco": {"train": train}}, tmp_path / "d")
    linked = tmp_path / "linked"  # the link as prepare.inputs itself is fine: DVC follows it
    linked.symlink_to(tmp_path / "real", target_is_directory=True)
    run({"source": "coco", "inputs": str(linked), "coco": {"train": {
        "json_file": str(linked / "train/annotations.json"), "image_dir": str(linked / "train/images")}}},
        tmp_path / "d")
    params = load_params(REPO / "params.yaml")
    del params["prepare"]["inputs"]
    with pytest.raises(ValueError, match=r"\$\{prepare.inputs\} is not in params.yaml.*add it"):
        read_stages(REPO / "dvc.yaml", params)


def test_write_if_changed_dates_by_what_made_the_outputs(tmp_path):
    target = tmp_path / "s.json"
    assert write_if_changed(target, "a", lambda: True) and target.stat().st_mtime == 0
    assert write_if_changed(target, "b", lambda: False) and target.stat().st_mtime > time.time() - 60
    os.utime(target, (5, 5))
    asked = []
    assert not write_if_changed(target, "b", lambda: asked.append(1) or True)  # same text: untouched
    assert target.stat().st_mtime == 5 and not asked


@pytest.mark.slow
def test_dvc_and_snakemake_rerun_prepare_when_the_user_data_change(tmp_path):
    """A user's COCO data under `inputs/`. Snakemake's first look at outputs DVC made with other
    params than today's reruns the stage; one changed annotation file makes both runners want
    prepare again; a params change that DVC alone reproduced leaves Snakemake up to date."""
    env = tool_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo, env)
    generate(repo / "inputs" / "mine", 4, 2, 0, image_size=64, seed=6)
    params = load_params(repo / "params.yaml")
    params["prepare"].update(source="coco", contiguous_ids=True, coco={"images": "copy", **{
        s: {"json_file": f"inputs/mine/{s}/annotations.json", "image_dir": f"inputs/mine/{s}/images"}
        for s in ("train", "val")}})
    params["dataset"]["num_classes"] = 4

    def set_images(mode):
        params["prepare"]["coco"]["images"] = mode
        (repo / "params.yaml").write_text(dump_yaml(params))

    smk = ["snakemake", "-n", "--cores", "1", "prepare"]
    set_images("copy")
    run_tool(["dvc", "repro", "prepare"], repo, env)
    assert "prepare" in up_to_date_stages(str(repo))
    set_images("symlink")  # not reproduced: Snakemake's first look must not call data/ current
    assert "rule prepare:" in run_tool(smk, repo, env)
    run_tool(["dvc", "repro", "prepare"], repo, env)
    assert "up to date" in run_tool(["dvc", "status", "prepare"], repo, env)
    assert "Nothing to be done" in run_tool(smk, repo, env)

    ann = repo / "inputs" / "mine" / "train" / "annotations.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][:-1]
    ann.write_text(json.dumps(data))
    assert re.search(r"modified:\s+inputs", run_tool(["dvc", "status", "prepare"], repo, env))
    assert "rule prepare:" in run_tool(smk, repo, env)
    run_tool(["dvc", "repro", "prepare"], repo, env)

    set_images("copy")  # changed and reproduced by DVC alone: nothing left for Snakemake
    run_tool(["dvc", "repro", "prepare"], repo, env)
    assert "Nothing to be done" in run_tool(smk, repo, env)
