"""The feature store: a resumable Zarr v3 group of pooled features with provenance,
its write lock, and its export to Parquet and HDF5.
"""
