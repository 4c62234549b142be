"""The streaming extraction: typed configuration, items planned from a manifest, their
inputs read and preprocessed per batch, the worker task, the executors (threads or Dask)
and the driver that writes whole store chunks.
"""
