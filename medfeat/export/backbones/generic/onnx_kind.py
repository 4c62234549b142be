"""``onnx:<file>``: an ONNX graph whose named outputs are the taps, run by ONNX Runtime.

Input kind and size come from the graph's input (rank 4: a 2D image; rank 5: a volume, a
pair when it has 2 channels) when its dimensions are fixed, else from ``--input-kind`` /
``--input-size``; ``--intensity`` is required. Taps are the graph outputs (``/`` and ``:``
in names become ``.``), in the order the graph computes them. Cutting after the last tap
extracts the subgraph that computes the taps up to it (``onnx.utils.Extractor``), so
nothing past it runs. A graph with a fixed batch of 1 is run item by item.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medfeat.errors import InputError, WeightsError
from medfeat.export.backbones.generic import ModelInputs, array_name, need_inputs, tap_name
from medfeat.export.backbones.generic.hooks import tap_from_shape
from medfeat.export.backbones.spec import BackboneSpec, InputKind, TappedModel, TapSpec
from medfeat.export.backbones.weights import sha256_file

if TYPE_CHECKING:
    from onnx import ModelProto
    from onnxruntime import InferenceSession


def _session(model_bytes: bytes) -> InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


class OnnxModel(TappedModel):
    """An ONNX graph in ONNX Runtime (CPU). ``names`` maps tap names to graph output names."""

    def __init__(self, model: ModelProto, names: dict[str, str]) -> None:
        super().__init__()
        self.model = model
        self.names = dict(names)
        self._load()

    def _load(self) -> None:
        self.session = _session(self.model.SerializeToString())
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None

    def tap_names(self) -> list[str]:
        return list(self.names)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        arr = x.detach().to("cpu", torch.float32).numpy()
        wanted = [self.names[t] for t in taps]
        if self.fixed_batch == 1 and len(arr) != 1:  # a graph traced at batch 1: item by item
            parts = [self.session.run(wanted, {self.input_name: arr[i:i + 1]}) for i in range(len(arr))]
            outs = [np.concatenate([p[k] for p in parts]) for k in range(len(wanted))]
        else:
            outs = self.session.run(wanted, {self.input_name: arr})
        return {t: torch.from_numpy(np.asarray(o)).to(x.device) for t, o in zip(taps, outs)}

    def prune_after(self, tap: str) -> None:
        """Keep only the subgraph computing the taps up to ``tap``."""
        from onnx.utils import Extractor

        keep = self.tap_names()[: self.tap_names().index(tap) + 1]
        self.model = Extractor(self.model).extract_model([self.input_name], [self.names[t] for t in keep])
        self.names = {t: self.names[t] for t in keep}
        self._load()

    def raw_onnx(self, example: torch.Tensor, opset: int) -> tuple[ModelProto, str, dict[str, str]]:
        """The graph (pruned), its input name and tap -> output name: for export (``example``
        and ``opset`` are not needed: the graph is what it is)."""
        return self.model, self.input_name, dict(self.names)


def read(path: Path) -> ModelProto:
    import onnx

    if not path.is_file():
        raise InputError(f"onnx:{path}: file not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have many types
        raise InputError(f"onnx:{path}: not an ONNX file ({' '.join(str(exc).split())[:160]})") from exc


def _declared(model: ModelProto) -> tuple[int | None, InputKind | None, tuple[int, ...] | None]:
    """Channels, input kind and spatial size the graph's input fixes (None where dynamic)."""
    init = {i.name for i in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in init)
    if graph_input.type.tensor_type.elem_type != 1:  # TensorProto.FLOAT
        raise InputError(f"graph input {graph_input.name!r} is not float32")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) not in (4, 5):
        raise InputError(f"graph input {graph_input.name!r} has rank {len(dims)}; expected (B, C, H, W) or (B, C, D, H, W)")
    channels = dims[1]
    kind: InputKind | None = "image2d" if len(dims) == 4 else ("pair3d" if channels == 2 else
                                                               "volume3d" if channels == 1 else None)
    spatial = tuple(dims[2:])
    return channels, kind, (tuple(int(v) for v in spatial) if all(spatial) else None)  # type: ignore[arg-type]


def make_spec(name: str, target: str, inputs: ModelInputs, config: dict[str, Any]) -> BackboneSpec:
    path = Path(target).expanduser().resolve()
    model = read(path)
    try:
        channels, kind_decl, size_decl = _declared(model)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    kind, size, rule = need_inputs(name, inputs, kind=kind_decl, size=size_decl)
    channels = channels or {"image2d": 3, "volume3d": 1, "pair3d": 2}[kind]
    probe = OnnxModel(model, {o.name: o.name for o in model.graph.output})
    try:
        outs = probe.session.run(None, {probe.input_name: np.zeros((1, channels, *size), np.float32)})
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        raise InputError(f"{name}: does not run at input size {size}: {' '.join(str(exc).split())[:200]}") from exc
    producer = {o: i for i, node in enumerate(model.graph.node) for o in node.output}
    taps: list[TapSpec] = []
    names: dict[str, str] = {}
    for out, value in sorted(zip(model.graph.output, outs), key=lambda ov: producer.get(ov[0].name, -1)):
        value = np.asarray(value)
        tap = tap_from_shape(tap_name(out.name), value.shape, kind, size)
        if tap is not None and value.dtype.kind == "f":
            taps.append(tap)
            names[tap.name] = out.name
    if not taps:
        raise InputError(f"{name}: no floating output to tap")

    def build(**cfg: Any) -> OnnxModel:
        return OnnxModel(read(path), names)

    def refuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise WeightsError(f"{name}: the ONNX file holds its weights; --weights is not taken")

    return BackboneSpec(
        name=name, input_kind=kind, input_size=size, in_channels=channels, preprocess=rule, taps=tuple(taps),
        build=build, convert_checkpoint=refuse, description=f"ONNX graph {path.name} in ONNX Runtime",
        array_name=array_name("onnx", str(path)),
        identity={"file": str(path), "sha256": sha256_file(path), "outputs": names})
