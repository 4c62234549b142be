"""Shared pieces of the parity suite (``tests/parity``): seeded weights, checkpoints written in
the released layouts, the relative error, and the fixtures made from upstream code.

Relative error of a tap: ``max |ours - upstream| / max |upstream|`` over the whole raw tap
tensor (fp32 on both sides); the suite's tolerance is :data:`TOL`. Every comparison is
recorded in :data:`ERRORS`, and ``tests/parity/conftest.py`` prints the largest error per
family at the end of the run.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TOL = 1e-5
FIXTURES = Path(__file__).resolve().parents[1] / "parity" / "fixtures"
ERRORS: dict[str, float] = {}  # family -> largest relative error seen in this run


def upstream(module: str) -> Any:
    """Import an upstream package of the ``parity`` extra, or fail saying how to install it
    (they all install from PyPI, so a missing one is a setup error, not a reason to skip)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        import pytest

        pytest.fail(f"{module}: {exc}; install the parity extra (make parity, or pip install -e '.[parity]')",
                    pytrace=False)


@torch.no_grad()
def randomize(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add seeded noise to every float tensor of the state dict (parameters and persistent
    buffers such as BatchNorm statistics; derived buffers like identity maps are left alone),
    so that zero-initialised parts (relative-position tables, last convs, layer scales) are
    exercised; running variances stay positive. Returns ``module`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        else:
            tensor.add_(scale * noise)
    module.eval()  # not `return module.eval()`: some upstream train() overrides return None
    return module


def seeded_input(*shape: int, seed: int = 0) -> torch.Tensor:
    """A float32 input with values of order 1."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|`` (shapes must be equal)."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(ours.shape)} != upstream's {tuple(ref.shape)}")
    scale = float(ref.abs().max())
    return float((ours.double() - ref.double()).abs().max()) / (scale if scale > 0 else 1.0)


def check_taps(family: str, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
               tol: float = TOL) -> dict[str, float]:
    """Assert every tap of ``ref`` is in ``ours`` within ``tol``; record and return the errors."""
    missing = sorted(set(ref) - set(ours))
    assert not missing, f"{family}: taps not computed: {missing}"
    errors = {tap: rel_error(ours[tap], ref[tap]) for tap in ref}
    ERRORS[family] = max(ERRORS.get(family, 0.0), *errors.values())
    bad = {tap: err for tap, err in errors.items() if not err <= tol}
    assert not bad, f"{family}: relative error above {tol:g} at " + ", ".join(
        f"{tap} {err:.2e}" for tap, err in bad.items())
    return errors


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], *, prefix: str = "",
                    wrap: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write ``state`` as a released checkpoint would be: keys under ``prefix``, the dict
    nested under ``wrap`` (e.g. ``"model"``, ``"model_state_dict"``), with ``extra`` entries
    (other sub-models' tensors, epoch counters) beside it."""
    body: dict[str, Any] = {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in state.items()}
    if wrap is not None:
        body = {wrap: body}
    body.update(extra or {})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(body, str(path))
    else:
        torch.save(body, path)
    return str(path)


def load_trunk(name: str, weights: str, *, config: dict[str, Any] | None = None, tiny: bool = True,
               taps: list[str] | None = None) -> nn.Module:
    """``create_backbone(name, every tap, weights=...)``'s trunk, in eval mode: the model the
    registry builds from a checkpoint file, untruncated (the last tap kept)."""
    from medfeat.export.backbones.registry import create_backbone, get_spec

    spec = get_spec(name)
    cfg = {**(spec.tiny_config if tiny else {}), **(config or {})}
    names = taps or [t.name for t in spec.tap_table(**cfg)]
    backbone = create_backbone(name, names, weights=weights, tiny=tiny, config=config)
    assert backbone.provenance["weights_sha256"], "weights were not loaded"
    return backbone.trunk.eval()


def all_taps(name: str, config: dict[str, Any] | None = None, tiny: bool = True) -> list[str]:
    """Every tap of a registry entry for a build config."""
    from medfeat.export.backbones.registry import get_spec

    spec = get_spec(name)
    return [t.name for t in spec.tap_table(**{**(spec.tiny_config if tiny else {}), **(config or {})})]


@dataclass
class Fixture:
    """Reference outputs made once by running fetched upstream code (``tests/parity/make_fixtures.py``).

    state : the upstream module's own state dict (its own key names).
    inputs : name -> input tensor.
    refs : input name -> {tap: upstream's tensor}.
    meta : upstream repository, commit, file, build arguments.
    """

    state: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    refs: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]


def write_fixture(name: str, state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                  refs: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any], folder: Path = FIXTURES) -> Path:
    """Store a :class:`Fixture` as ``folder/<name>.safetensors`` (metadata as JSON)."""
    from safetensors.torch import save_file

    tensors = {f"state/{k}": v for k, v in state.items()}
    tensors.update({f"input/{k}": v for k, v in inputs.items()})
    tensors.update({f"ref/{i}/{tap}": v for i, taps in refs.items() for tap, v in taps.items()})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})
    return path


def read_fixture(name: str, folder: Path = FIXTURES) -> Fixture:
    """Read a fixture written by :func:`write_fixture`."""
    from safetensors import safe_open

    path = folder / f"{name}.safetensors"
    state: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    refs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})["meta"])
        for key in fh.keys():
            kind, _, rest = key.partition("/")
            if kind == "state":
                state[rest] = fh.get_tensor(key)
            elif kind == "input":
                inputs[rest] = fh.get_tensor(key)
            else:
                item, _, tap = rest.partition("/")
                refs.setdefault(item, {})[tap] = fh.get_tensor(key)
    return Fixture(state, inputs, refs, meta)
