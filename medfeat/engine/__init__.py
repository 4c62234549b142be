"""The streaming extraction (``pipeline``: items, inputs, workers, executors, the driver)
and what it writes (``store``: the Zarr v3 feature store, its lock, its exports).
"""
