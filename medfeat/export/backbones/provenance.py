"""Reading a backbone's provenance record (light: no torch), e.g. in store summaries."""
from __future__ import annotations

from typing import Any


def random_weights(provenance: dict[str, Any]) -> bool:
    """Whether features with this provenance come from seeded random weights: no checkpoint
    file, and no weights of a generic model's own (an ONNX or TorchScript file, a Hugging Face
    folder's files, a user factory that builds the module)."""
    source = provenance.get("source") or {}
    return not (provenance.get("weights_sha256") or source.get("sha256") or source.get("files")
                or source.get("factory"))
