# Snakemake view of dvc.yaml: one rule per DVC stage, same commands, same DAG.
#   snakemake -n                          # dry run
#   snakemake --cores 2                   # run everything locally
#   snakemake --profile profiles/slurm    # on a SLURM cluster (snakemake-executor-plugin-slurm)
# Params come from params.yaml, read with YAML 1.2 floats (not Snakemake's `configfile:` loader,
# which reads 1e-4 as a string). Each rule lists .snakemake/stage_params/<stage>.json, rewritten
# only when the stage's params change, so a param change reruns the stage and its dependents
# (dated 0 when DVC says the outputs on disk are current: pipeline/dvc_status.py).
import sys

sys.path.insert(0, workflow.basedir)

from pipeline.params import load_params
from pipeline.dvc_status import up_to_date_stages
from pipeline.stages import code_files, is_directory, read_stages, stage_params_text, write_if_changed

PARAMS = load_params("params.yaml")
STAGES = read_stages("dvc.yaml", PARAMS)  # `${prepare.inputs}` in a dep: the user's data folder
PRODUCED = {out for stage in STAGES for out in stage.outs}


def _outputs(stage):
    return [directory(p) if is_directory(p) else p for p in stage.outs]


def _inputs(stage):
    params_file = f".snakemake/stage_params/{stage.name}.json"
    # a new or changed params file is dated 0 only if DVC says the outputs on disk are current
    write_if_changed(params_file, stage_params_text(stage, PARAMS),
                     lambda: stage.name in up_to_date_stages(workflow.basedir))
    files = [params_file]
    for dep in stage.deps:
        files += [dep] if dep in PRODUCED else code_files(dep)
    return files


rule all:
    input:
        [out for stage in STAGES for out in stage.outs],
    default_target: True


for _stage in STAGES:

    rule:
        name:
            _stage.name
        input:
            _inputs(_stage),
        output:
            _outputs(_stage),
        params:
            # bound now: a `shell: _stage.cmd` would run the LAST stage's command in every rule
            cmd=_stage.cmd,
        resources:
            **_stage.resources,
        shell:
            "{params.cmd}"
