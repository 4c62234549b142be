"""Zarr v3 cohort stores: one chunked, compressed array per scan, OME-Zarr (NGFF 0.5) metadata.

Layout written by :func:`medfeat.cohorts.ingest.ingest_cohort` (``medfeat cohort ingest``)::

    cohort.zarr/                    group; attrs["medfeat_cohort"] = format, created, source
      manifest.csv                  the input manifest with ``path`` / ``mask_path`` pointing
                                    at the scan groups below (relative to this folder)
      scans/<subject>/<timepoint>/  one NGFF image group per scan: attrs["ome"]["multiscales"]
          0                         (D, H, W) float32 array, chunks of ``chunk``^3, zstd
      masks/<subject>/<timepoint>/  the same for label maps (uint8)

NGFF coordinate transformations hold only scale and translation, so they describe the
axis-aligned part of the header (spacing, origin); the full 4x4 voxel -> world (RAS mm)
affine, oblique rotation included, is kept beside it in ``attrs["medfeat"]["affine"]`` and
is what :func:`read_zarr_volume` uses. Scans with more than ``SHARD_MIN_CHUNKS`` chunks are
sharded (one shard file per scan) so a cohort does not become millions of small files.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfeat.errors import InputError, UnknownNameError, one_line
from medfeat.io.nifti import Volume, affine_spacing, check_affine

if TYPE_CHECKING:  # zarr and dask are imported where used: the CLI starts without them
    import dask.array as da
    import zarr
    from zarr.abc.codec import BytesBytesCodec

CODECS = ("zstd", "blosc")
SHARD_MIN_CHUNKS = 8
NGFF_VERSION = "0.5"


def check_codec(codec: str) -> None:
    """Raise UnknownNameError for a codec name this module cannot write."""
    if codec not in CODECS:
        raise UnknownNameError(f"unknown codec {codec!r}; codecs: {', '.join(CODECS)}")


def _compressor(codec: str) -> BytesBytesCodec:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "zstd":
        return ZstdCodec(level=3)
    if codec == "blosc":
        return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    raise UnknownNameError(f"unknown codec {codec!r}; codecs: {', '.join(CODECS)}")


def ngff_attrs(name: str, affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` attributes of one single-scale 3D image (axes i, j, k in mm)."""
    spacing = affine_spacing(affine)
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in ("i", "j", "k")],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [float(s) for s in spacing]},
                {"type": "translation", "translation": [float(t) for t in affine[:3, 3]]},
            ]}],
        }],
    }


def write_zarr_volume(group: zarr.Group, name: str, vol: Volume, *, chunk: int = 64, codec: str = "zstd",
                      dtype: str = "float32") -> None:
    """Write ``vol`` as an NGFF image group ``name`` under zarr group ``group``."""
    g = group.require_group(name)
    shape = tuple(int(s) for s in vol.data.shape)
    chunks = tuple(min(chunk, s) for s in shape)
    n_chunks = int(np.prod([-(-s // c) for s, c in zip(shape, chunks)]))
    shards = tuple(-(-s // c) * c for s, c in zip(shape, chunks)) if n_chunks > SHARD_MIN_CHUNKS else None
    arr = g.create_array("0", shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                         compressors=[_compressor(codec)], fill_value=0, overwrite=True)
    arr[...] = vol.data.astype(dtype)
    g.attrs["ome"] = ngff_attrs(name, vol.affine, shape)
    g.attrs["medfeat"] = {"affine": vol.affine.tolist(), "spacing": vol.spacing.tolist(),
                          "source": str(vol.path) if vol.path else None}


def read_zarr_volume(path: str | Path) -> Volume:
    """Read one scan group (or its ``0`` array) of a Zarr cohort store as a :class:`Volume`.

    The voxels are read by zarr itself (its chunks fetched and decoded concurrently), then
    converted to (D, H, W) float32: about twice as fast as a Dask task per chunk, whose
    scheduling costs more than decoding a scan's few dozen chunks.
    """
    arr, affine, p = _open_scan(path)
    try:
        data = np.asarray(arr[:]).astype(np.float32, copy=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt chunk
        raise InputError(f"{p}: corrupt chunk ({one_line(exc, 160)})") from exc
    if not np.all(np.isfinite(data)):
        raise InputError(f"{p}: NaN or Inf voxels")
    return Volume(data=data, affine=affine, spacing=affine_spacing(affine), path=p)


def zarr_dask_array(path: str | Path) -> tuple[da.Array, np.ndarray, Path]:
    """A lazy float32 Dask array over a cohort scan, its (4, 4) voxel -> world affine, its path.

    The Dask chunks are the stored array's chunks (the inner chunks when sharded: zarr
    reads one chunk of a shard without the rest), so one task decodes one stored chunk.
    """
    import dask.array as da

    arr, affine, p = _open_scan(path)
    darr = da.from_zarr(arr, chunks=arr.chunks)
    return darr.astype(np.float32, copy=False), affine, p


def _open_scan(path: str | Path) -> tuple[zarr.Array, np.ndarray, Path]:
    """The scan's stored 3D array, its (4, 4) voxel -> world affine and its path; one-line
    errors for an unreadable store, a missing array, other dimensions or a bad affine."""
    import zarr

    p = Path(path)
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for bad stores
        raise InputError(f"{p}: unreadable Zarr ({one_line(exc, 160)})") from exc
    group, arr = (node, node["0"]) if isinstance(node, zarr.Group) else (zarr.open_group(str(p.parent), mode="r"), node)
    if not isinstance(arr, zarr.Array):
        raise InputError(f"{p}: '0' is a group, expected the scan's array")
    affine = _affine(dict(group.attrs), p)
    if arr.ndim != 3:
        raise InputError(f"{p}: expected a 3D array, got shape {arr.shape}")
    return arr, affine, p


def _affine(attrs: dict[str, Any], p: Path) -> np.ndarray:
    if "medfeat" in attrs and "affine" in attrs["medfeat"]:
        return check_affine(np.asarray(attrs["medfeat"]["affine"], np.float64), p)
    try:  # a plain NGFF image: scale and translation only
        ts = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    except (KeyError, IndexError, TypeError) as exc:
        raise InputError(f"{p}: no affine and no NGFF coordinate transformations") from exc
    a = np.eye(4)
    for t in ts:
        if t["type"] == "scale":
            a[:3, :3] = np.diag(t["scale"][-3:])
        elif t["type"] == "translation":
            a[:3, 3] = t["translation"][-3:]
    return check_affine(a, p)
