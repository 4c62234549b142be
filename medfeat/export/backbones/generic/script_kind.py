"""``torchscript:<file>``: a scripted or traced module whose named outputs are the taps.

The module returns a dict of tensors (its keys are the taps, in the order it returns them),
a tuple (taps ``output.0``, ``output.1``, ...) or one tensor (``output``). It declares no
input, so ``--input-kind``, ``--input-size`` and ``--intensity`` are required; the taps'
shapes come from one forward on zeros. The file holds the weights (its sha256 goes into
provenance). A TorchScript graph cannot be cut: the module runs whole, whatever the taps.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medfeat.errors import InputError, WeightsError
from medfeat.export.backbones.generic import ModelInputs, array_name, need_inputs, tap_name
from medfeat.export.backbones.generic.hooks import tap_from_shape
from medfeat.export.backbones.spec import BackboneSpec, TappedModel, TapSpec
from medfeat.export.backbones.weights import sha256_file

if TYPE_CHECKING:
    from onnx import ModelProto


def named_outputs(out: object) -> dict[str, torch.Tensor]:
    """A module's output as ``{raw name: tensor}``."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output.{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise InputError(f"the module returns {type(out).__name__}, not tensors")


class ScriptModel(TappedModel):
    """A TorchScript module; ``names`` maps tap names to its raw output names."""

    def __init__(self, net: torch.jit.ScriptModule, names: dict[str, str]) -> None:
        super().__init__()
        self.net = net
        self.names = names

    def tap_names(self) -> list[str]:
        return list(self.names)

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        out = named_outputs(self.net(x))
        return {t: out[self.names[t]] for t in taps}

    def prune_after(self, tap: str) -> None:
        """Nothing to cut: a scripted graph runs whole (its provenance says so)."""

    def raw_onnx(self, example: torch.Tensor, opset: int) -> tuple[ModelProto, str, dict[str, str]]:
        """The module exported to ONNX (dynamic batch), its input name and tap -> output name.

        A scripted module's dict output has no ONNX form: a traced wrapper returns the taps
        as a tuple, and the trace (which inlines the scripted calls) is exported."""
        import io
        import warnings

        import onnx

        raw = [self.names[t] for t in self.names]
        out_names = [f"raw_{i}" for i in range(len(raw))]
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_AsTuple(self.net, raw), (example,), strict=False)
            torch.onnx.export(traced, (example,), buf, opset_version=opset, dynamo=False)  # type: ignore[arg-type]
        model = onnx.load_from_string(buf.getvalue())
        # the exporter ignores names and dynamic axes for a ScriptModule: set them here (the
        # parity check at other batch sizes then proves the batch axis is really free)
        _rename_io(model, {model.graph.input[0].name: "raw_input"},
                   {o.name: n for o, n in zip(model.graph.output, out_names)})
        for value in [model.graph.input[0], *model.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
        return model, "raw_input", dict(zip(self.names, out_names))


def _rename_io(model: ModelProto, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    names = {**inputs, **outputs}
    for node in model.graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
    for value in [*model.graph.input, *model.graph.output]:
        value.name = names.get(value.name, value.name)


class _AsTuple(torch.nn.Module):
    def __init__(self, net: torch.jit.ScriptModule, raw: list[str]) -> None:
        super().__init__()
        self.net = net
        self.raw = raw

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = named_outputs(self.net(x))
        return tuple(out[r] for r in self.raw)


def load(path: Path) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise InputError(f"torchscript:{path}: file not found")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"torchscript:{path}: not a TorchScript file ({' '.join(str(exc).split())[:160]})") from exc


def make_spec(name: str, target: str, inputs: ModelInputs, config: dict[str, Any]) -> BackboneSpec:
    path = Path(target).expanduser().resolve()
    net = load(path)
    kind, size, rule = need_inputs(name, inputs)
    channels = int(config.get("in_channels", {"image2d": 3, "volume3d": 1, "pair3d": 2}[kind]))
    try:
        with torch.no_grad():
            raw = named_outputs(net(torch.zeros(1, channels, *size)))
    except Exception as exc:  # noqa: BLE001 - whatever the scripted code raises
        raise InputError(f"{name}: does not run on a (1, {channels}, {', '.join(map(str, size))}) input: "
                         f"{' '.join(str(exc).split())[:200]}") from exc
    taps: list[TapSpec] = []
    names: dict[str, str] = {}
    for raw_name, value in raw.items():
        tap = tap_from_shape(tap_name(raw_name), tuple(value.shape), kind, size)
        if tap is not None and value.is_floating_point():
            taps.append(tap)
            names[tap.name] = raw_name
    if not taps:
        raise InputError(f"{name}: no floating tensor output to tap")

    def build(**cfg: Any) -> ScriptModel:
        return ScriptModel(load(path), names)

    def refuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise WeightsError(f"{name}: the TorchScript file holds its weights; --weights is not taken")

    return BackboneSpec(
        name=name, input_kind=kind, input_size=size, in_channels=channels, preprocess=rule, taps=tuple(taps),
        build=build, convert_checkpoint=refuse,
        description=f"TorchScript {path.name} (runs whole: a scripted graph is not cut)",
        array_name=array_name("torchscript", str(path)),
        identity={"file": str(path), "sha256": sha256_file(path), "outputs": names, "pruned": False})
