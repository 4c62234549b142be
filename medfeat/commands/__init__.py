"""CLI command modules. Each has ``register(groups: dict[str, click.Group])``.

One module per area, so that work on one area does not touch another's file.

The CLI imports every module here at start-up, so their module level must stay light:
click and the standard library only. Import torch, pandas, zarr, dask, numba, scipy and
the medfeat modules that pull them in inside the command functions, and keep choice lists
as literals (``tests/cli/test_startup.py`` checks both).
"""

COMMAND_MODULES = (
    "cohort_cmds",   # cohort synth
    "data2d_cmds",   # cohort synth2d
    "ingest_cmds",   # cohort ingest
    "models_cmds",   # models list / show
    "unet_cmds",     # models train-unet
    "gradicon_cmds", # models train-gradicon
    "extract_cmds",  # extract
    "store_cmds",    # store info / verify / export
    "probe_cmds",    # probe train / sweep / report / compare
    "finetune_cmds", # finetune
    "export_cmds",   # export, doctor
    "run_cmds",      # run EXPERIMENT, demo
    "bench_cmds",    # bench
)
