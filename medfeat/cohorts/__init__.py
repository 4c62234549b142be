"""Cohorts made or converted: the synthetic knee cohorts (3D, with anatomy), synthetic
2D sets, the transfer study's datasets as manifests, and ingest into Zarr.
"""
