"""The reproducible pipeline: one module per stage (prepare, backbone, train, report) plus helpers.

`dvc.yaml` is the stage table (evaluate, inference and export run the `codetr` CLI directly); the
`Snakefile` reads the same table, so `dvc repro` and `snakemake` run the same DAG.
"""
