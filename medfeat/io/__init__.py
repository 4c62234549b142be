"""Scans and manifests in: NIfTI, DICOM, Zarr scans and OME-Zarr, 2D images, cohort manifests.

The ground floor for data: every reader returns a :class:`~medfeat.io.nifti.Volume` (voxels
and a voxel -> world mm affine) or an image array, and every bad file becomes one
:class:`~medfeat.errors.InputError` line naming the file and the reason.
"""
