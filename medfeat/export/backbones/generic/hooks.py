"""Tapping any ``nn.Module`` by module path with forward hooks, and cutting what runs after.

:func:`trace_calls` runs the module once (on the meta device when it can: no arithmetic,
no memory; else on zeros) with a pre- and a post-hook on every submodule, which gives the
order in which submodules start and finish, and each one's output shape. That order is
the forward order of taps, and it says which submodules only start after the last tap has
finished: :meth:`HookedModel.prune_after` removes them, truncating an ``nn.Sequential``
(a real cut) and putting a :class:`Cut` placeholder, which raises if called, anywhere
else. At run time the hook of the last requested tap stops the forward (an exception the
model's own ``except Exception`` cannot swallow), so no work runs past the last tap.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError
from medfeat.export.backbones.spec import InputKind, TappedModel, TapSpec


class _EarlyExit(BaseException):
    """Raised by the last tap's hook; a BaseException, so ``except Exception`` lets it pass."""


class Cut(nn.Module):
    """Stands where a submodule that runs only after the last tap was."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.path} was pruned: it runs after the last tap")


def first_tensor(out: object) -> torch.Tensor | None:
    """A module output's tensor: the output itself, or the first item of a tuple / list
    (transformer layers return ``(hidden, attention, ...)``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@dataclass
class CallTrace:
    """Submodule call order of one forward: ``start`` / ``end`` index of each submodule's
    first call, and its output's shape (tensor outputs only)."""

    start: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    output: Any = None  # the model's own output (meta tensors after a meta run)


def call_module(net: nn.Module, x: torch.Tensor, input_name: str | None) -> Any:
    """``net(x)``, or ``net(**{input_name: x})`` (Hugging Face models take ``pixel_values=``)."""
    return net(x) if input_name is None else net(**{input_name: x})


def trace_calls(net: nn.Module, shape: tuple[int, ...], input_name: str | None = None) -> CallTrace:
    """Run ``net`` once on an input of ``shape`` (B, C, *spatial) and record its calls."""
    trace = CallTrace()
    counter = itertools.count()
    handles = []

    def pre(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            trace.start.setdefault(path, next(counter))
        return hook

    def post(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
            if path not in trace.end:
                trace.end[path] = next(counter)
                t = first_tensor(out)
                if t is not None:
                    trace.shapes[path], trace.dtypes[path] = tuple(t.shape), t.dtype
        return hook

    for path, module in net.named_modules():
        if path:
            handles += [module.register_forward_pre_hook(pre(path)), module.register_forward_hook(post(path))]
    try:
        trace.output = _run_meta(net, shape, input_name)
    except Exception:  # noqa: BLE001 - an op without a meta kernel, data-dependent code: run it for real
        for table in (trace.start, trace.end, trace.shapes, trace.dtypes):
            table.clear()
        try:
            with torch.no_grad():
                trace.output = call_module(net, torch.zeros(shape), input_name)
        except Exception as exc:
            raise InputError(f"the model does not run on an input of shape {shape}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return trace


def _run_meta(net: nn.Module, shape: tuple[int, ...], input_name: str | None) -> Any:
    """Forward on the meta device, with the module's own tensors swapped for meta copies."""
    state = {k: v.to("meta") for k, v in itertools.chain(net.named_parameters(), net.named_buffers())}
    x = torch.zeros(shape, device="meta")
    args, kwargs = ((x,), {}) if input_name is None else ((), {input_name: x})
    with torch.no_grad():
        return torch.func.functional_call(net, state, args, kwargs, strict=False)


def tap_from_shape(name: str, shape: tuple[int, ...], kind: InputKind,
                   size: tuple[int, ...]) -> TapSpec | None:
    """A tap for an output of ``shape`` (batch first), or None when it is not one.

    (B, C, *spatial) with the input's spatial rank: a map (reduction from the first axis);
    (B, N, C): tokens, the leading tokens beyond the largest square (cube) count as prefix
    tokens (CLS, registers) when there are at most 16; (B, C): a vector.
    """
    spatial = 2 if kind == "image2d" else 3
    if len(shape) == 2 + spatial:
        reduction = max(1, round(size[0] / max(1, shape[2])))
        return TapSpec(name, int(shape[1]), reduction, "map", "avg")
    if len(shape) == 3:
        n = int(shape[1])
        side = math.floor(n ** (1 / spatial) + 1e-9)
        prefix = n - side**spatial if 0 < n - side**spatial <= 16 else 0
        reduction = max(1, round(size[0] / side)) if side else 1
        return TapSpec(name, int(shape[2]), reduction, "tokens", "mean", prefix)
    if len(shape) == 2:
        return TapSpec(name, int(shape[1]), 1, "vector", "none")
    return None


def module_taps(trace: CallTrace, kind: InputKind, size: tuple[int, ...],
                paths: dict[str, str] | None = None) -> tuple[TapSpec, ...]:
    """Taps of every submodule with a floating tensor output, in the order they finish.

    ``paths`` maps tap names to module paths (default: each path is its own name).
    """
    names = paths or {p: p for p in trace.end}
    out = []
    for name, path in sorted(names.items(), key=lambda kv: trace.end.get(kv[1], -1)):
        if path in trace.shapes and trace.dtypes[path].is_floating_point:
            tap = tap_from_shape(name, trace.shapes[path], kind, size)
            if tap is not None:
                out.append(tap)
    return tuple(out)


class HookedModel(TappedModel):
    """Any module, tapped at submodule outputs.

    Parameters
    ----------
    net : the model.
    points : tap name -> module path whose (first tensor) output is the tap.
    example_shape : (1, C, *spatial) input shape used to trace the call order.
    input_name : keyword of the input (None: positional).
    outputs : tap name -> function of the model's full output (pooled outputs that only
        exist at the end, e.g. a Hugging Face ``pooler_output``).
    """

    def __init__(self, net: nn.Module, points: dict[str, str], example_shape: tuple[int, ...],
                 input_name: str | None = None,
                 outputs: dict[str, Callable[[Any], torch.Tensor]] | None = None,
                 order: list[str] | None = None) -> None:
        super().__init__()
        self.net = net
        self.points = dict(points)
        self.outputs = dict(outputs or {})
        self.example_shape = tuple(example_shape)
        self.input_name = input_name
        self.order = order or [*self.points, *self.outputs]
        self.pruned: list[str] = []

    def tap_names(self) -> list[str]:
        return list(self.order)

    def forward(self, x: torch.Tensor) -> Any:
        return call_module(self.net, x, self.input_name)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        from_output = [t for t in taps if t in self.outputs]
        hooked = [t for t in taps if t not in self.outputs]
        handles = []
        for tap in hooked:
            module = self.net.get_submodule(self.points[tap])
            handles.append(module.register_forward_hook(self._capture(tap, captured, set(hooked), not from_output)))
        out = None
        try:
            out = call_module(self.net, x, self.input_name)
        except _EarlyExit:
            pass
        finally:
            for h in handles:
                h.remove()
        for tap in from_output:
            captured[tap] = self.outputs[tap](out)
        missing = [t for t in taps if t not in captured]
        if missing:
            raise InputError(f"taps {', '.join(missing)} produced no tensor in this forward")
        return {t: captured[t] for t in taps}

    @staticmethod
    def _capture(tap: str, captured: dict[str, torch.Tensor], wanted: set[str],
                 stop: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
            if tap not in captured:
                t = first_tensor(out)
                if t is not None:
                    captured[tap] = t
            if stop and wanted <= set(captured):
                raise _EarlyExit
        return hook

    def prune_after(self, tap: str) -> None:
        """Remove every submodule that starts after ``tap``'s module has finished (nothing
        when ``tap`` is read from the model's final output)."""
        if tap in self.outputs:
            return
        trace = trace_calls(self.net, self.example_shape, self.input_name)
        last = trace.end[self.points[tap]]
        after = sorted((p for p, s in trace.start.items() if s > last), key=lambda p: p.count("."))
        top: list[str] = []
        for path in after:
            if not any(path.startswith(t + ".") for t in top):
                top.append(path)
        for path in top:
            parent_path, _, child = path.rpartition(".")
            parent = self.net.get_submodule(parent_path) if parent_path else self.net
            if isinstance(parent, nn.Sequential):
                delattr(parent, child)  # trailing children of a sequential: a real cut
            else:
                parent.add_module(child, Cut(path))
        self.pruned = top
