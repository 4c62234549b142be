"""The transfer study's own data choices (Palés Huix et al. 2024), as its code makes them.

From joanaapa/Foundation-Medical (commit a7aa194, ``defaults/datasets.py`` and
``defaults/bases.py``):

* :data:`STUDY_MEAN_STD`: each dataset's own normalisation statistics (on [0, 1] pixels),
  used instead of the models' ImageNet/CLIP statistics;
* :func:`study_split_ids`: ``BaseSet.get_validation_ids``: the row indices ``0..N-1``
  shuffled by ``random.Random(42)``; the first ``int(N * held_out)`` are held out and halved
  (the first ``int(len / 2)`` validation, the rest test), the others train. APTOS2019 holds
  out 0.3 (70/15/15), ISIC2019 0.2 (80/10/10). The study saves the split to ``val_ids.json``
  in the dataset folder and reads it back; such a file is accepted here;
* :func:`chexpert_study_split`: ``CheXpert.get_data_as_list``: ``train.csv`` sorted by
  ``Path``, the first ``int(0.2 N) + 15`` rows held out and halved into validation and test.
  The study slices the sorted frame with ``.loc``, i.e. by the *original* row labels and
  inclusive of both ends; this is reproduced with pandas' own ``.loc``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.errors import ManifestError

# defaults/datasets.py: class attributes mean/std (DDSM: init_stats, whole images, not patches)
STUDY_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "aptos2019": ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081)),
    "isic2019": ((0.66776717, 0.52960888, 0.52434725), (0.22381877, 0.20363036, 0.21538623)),
    "chexpert": ((0.503,), (0.292,)),
    "ddsm": ((0.286,), (0.267,)),
}
STUDY_SEED = 42  # BaseSet.get_validation_ids(seed_n=42)


def study_split_ids(total: int, held_out: float, json_path: str | Path | None = None
                    ) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) row indices into a dataset of ``total`` rows, as the study splits.

    ``json_path`` is the study's ``val_ids.json`` (``{"train_split": [...], "val_split": [...]}``
    or the held-out list alone); used when the file exists. Its sizes must be the study's for
    ``total`` rows (the study would silently make and save a new split otherwise; here it is
    an error, since a file for another copy of the dataset would mislabel the splits).
    """
    n_held = int(total * held_out) if held_out < 1 else int(held_out)
    if json_path is not None and Path(json_path).is_file():
        train, held = _read_val_ids(Path(json_path), total)
        if len(held) != n_held or len(train) != total - n_held:
            raise ManifestError(f"{json_path}: holds {len(train)} training and {len(held)} held-out ids; "
                                f"the study's split of {total} rows has {total - n_held} and {n_held}")
    else:
        order = list(range(total))
        random.Random(STUDY_SEED).shuffle(order)
        train, held = order[n_held:], order[:n_held]
    half = int(len(held) / 2)
    return train, held[:half], held[half:]


def _read_val_ids(path: Path, total: int) -> tuple[list[int], list[int]]:
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        raise ManifestError(f"{path}: not JSON") from None
    if isinstance(doc, dict) and {"train_split", "val_split"} <= set(doc):
        train, held = [int(i) for i in doc["train_split"]], [int(i) for i in doc["val_split"]]
    elif isinstance(doc, list):
        held = [int(i) for i in doc]
        train = sorted(set(range(total)) - set(held))
    else:
        raise ManifestError(f"{path}: expected {{'train_split': [...], 'val_split': [...]}} or a list of ids")
    ids = train + held
    if len(set(ids)) != len(ids) or (ids and (min(ids) < 0 or max(ids) >= total)):
        raise ManifestError(f"{path}: ids repeat or fall outside 0..{total - 1}")
    return train, held


def chexpert_study_split(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """The study's CheXpert split of ``train.csv`` (``frame``, in file order).

    Returns the frame sorted by ``Path`` (its index: the original row labels), the split name
    of each of its rows, and the ``Path`` of rows the study's code puts in two parts.

    What the study's code does: ``info = frame.sort_values("Path")``; with
    ``n = int(0.2 N) + 15``, train is ``info.loc[n:]`` and the held-out part ``info.loc[:n]``;
    validation is ``held.loc[:int(len(held) / 2)]`` and test ``held.loc[int(len(held) / 2):]``.
    ``.loc`` slices by label, from the row *labelled* ``n`` (wherever sorting put it), and
    both ends are included: the row labelled ``n`` is in train and in the held-out part, the
    row labelled ``int(len(held) / 2)`` in validation and test. A manifest gives each item
    one split, so those rows are kept in test only: the test set is the study's exactly,
    train and validation have one row fewer each. A label that a slice needs but the sorted
    part lacks makes pandas (and the study) fail; it is reported as a ManifestError.
    """
    info = frame.sort_values(by=["Path"])
    n = int(len(info) * 0.2) + 15
    try:
        train = info.loc[n:]
        held = info.loc[:n]
        half = int(len(held) / 2)
        val, test = held.loc[:half], held.loc[half:]
    except KeyError as exc:
        raise ManifestError(f"CheXpert train.csv: the study's .loc split cannot be taken ({exc})") from None
    split = pd.Series("", index=info.index, dtype=object)
    split[train.index] = "train"
    split[val.index] = "val"
    twice = sorted(set(train.index) & set(held.index) | set(val.index) & set(test.index))
    split[test.index] = "test"
    return info, split.to_numpy(dtype=object), [str(info.at[i, "Path"]) for i in twice]
