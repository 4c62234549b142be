"""CLI command modules. Each has ``register(groups: dict[str, click.Group])``.

One module per area, so that work on one area does not touch another's file.
"""

COMMAND_MODULES = (
    "cohort_cmds",   # cohort synth
    "data2d_cmds",   # cohort synth2d
    "ingest_cmds",   # cohort ingest
    "models_cmds",   # models list / show
    "unet_cmds",     # models train-unet
    "extract_cmds",  # extract
    "store_cmds",    # store info / verify / export
    "probe_cmds",    # probe train / sweep / report / compare
    "export_cmds",   # export, doctor
    "run_cmds",      # run EXPERIMENT, demo
    "bench_cmds",    # bench
)
