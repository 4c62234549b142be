"""Real-world checkpoints: training checkpoints that pickle plain objects beside the weights,
refused globals named, and old checkpoints without ``num_batches_tracked``."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medfeat.errors import WeightsError
from medfeat.export.backbones.registry import _REGISTRY, create_backbone, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec
from medfeat.export.backbones.weights import fill_norm_counters, read_checkpoint


class Unpicklable:
    """A class of someone's training code: must never be unpickled."""

    def __init__(self) -> None:
        self.x = 1


class BNNet(TappedModel):
    """conv -> batch norm -> conv: the layout of an old 3D segmentation net."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.head = nn.Conv3d(4, 2, 1)

    def tap_names(self) -> list[str]:
        return ["stem", "head"]

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        out = {"stem": self.stem(x)}
        if "head" in taps:
            out["head"] = self.head(out["stem"])
        return {t: out[t] for t in taps}

    def prune_after(self, tap: str) -> None:
        if tap == "stem":
            self.head = nn.Identity()  # type: ignore[assignment]


if "bnnet_test" not in _REGISTRY:
    register_backbone(BackboneSpec("bnnet_test", "volume3d", (8, 8, 8), 1, Preprocess("zscore"),
                                   (TapSpec("stem", 4), TapSpec("head", 2)), build=lambda **cfg: BNNet()))


def _sam_med3d_style(path: Path, state: dict[str, torch.Tensor], **extra: object) -> Path:
    """A checkpoint laid out as SAM-Med3D's training script saves it."""
    args = argparse.Namespace(task_name="ft_b2x1", img_size=128, lr=8e-5, work_dir=Path("work_dir"),
                              multi_gpu=False, gpu_ids=[0, 1])
    torch.save({"epoch": 12, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "losses": [np.float64(0.5), np.float64(0.4)], "dices": np.array([0.6, 0.7]),
                "best_loss": np.float32(0.4), "best_dice": 0.7, "args": args, "used_datas": ["a", "b"],
                **extra}, path)
    return path


def test_training_checkpoint_with_a_namespace_loads(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = BNNet()
    path = _sam_med3d_style(tmp_path / "sam_med3d_turbo.pth", ref.state_dict())
    state = read_checkpoint(path)
    assert set(state) == set(ref.state_dict())
    bb = create_backbone("bnnet_test", ["head"], weights=str(path))
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        want = ref.eval().head(ref.stem(x)).mean(dim=(2, 3, 4))
        got = bb(x)["head"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert "weights_filled" not in bb.provenance


def test_checkpoint_with_an_unknown_class_is_refused_by_name(tmp_path: Path) -> None:
    path = _sam_med3d_style(tmp_path / "bad.pth", BNNet().state_dict(), trainer=Unpicklable())
    with pytest.raises(WeightsError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert f"{__name__}.Unpicklable" in msg or "Unpicklable" in msg
    assert "argparse.Namespace" not in msg.split("allow-list")[0]  # allowed: not named as refused
    assert "\n" not in msg


def test_checkpoint_with_a_function_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fn.pth"
    torch.save({"state_dict": BNNet().state_dict(), "hook": print}, path)
    with pytest.raises(WeightsError, match="builtins.print"):
        read_checkpoint(path)


def test_old_checkpoint_without_batch_counters_is_filled_and_said(tmp_path: Path) -> None:
    torch.manual_seed(4)
    ref = BNNet()
    old = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    bb = create_backbone("bnnet_test", ["stem"], weights=str(path))
    assert bb.provenance["weights_filled"].startswith("1 num_batches_tracked")
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)["stem"], ref.eval().stem(x).mean(dim=(2, 3, 4)), rtol=0, atol=1e-6)


def test_fill_norm_counters_fills_only_norm_layers_present() -> None:
    net = BNNet()
    state = {k: v for k, v in net.state_dict().items() if k != "stem.1.num_batches_tracked"}
    assert fill_norm_counters(net, state) == ["stem.1.num_batches_tracked"]
    assert state["stem.1.num_batches_tracked"].dtype == torch.long
    partial = {"stem.0.weight": net.stem[0].weight}  # no running stats: nothing to fill
    assert fill_norm_counters(net, partial) == []
    # other missing keys still fail strictly
    del state["head.bias"]
    path_state = dict(state)
    with pytest.raises(WeightsError, match="missing: head.bias"):
        from medfeat.export.backbones.weights import load_strict

        load_strict(net, path_state, "bnnet_test")


def test_wrapper_with_a_tensor_beside_the_weights_unwraps_to_the_weights(tmp_path: Path) -> None:
    """{"state_dict": {...}, "step": tensor}: half the wrapper's values are tensors, but the
    weights are the nested ones (not the one-tensor wrapper)."""
    torch.manual_seed(4)
    ref = BNNet().state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": ref, "step": torch.tensor(1200)}, path)
    state = read_checkpoint(path)
    assert set(state) == set(ref)
    torch.testing.assert_close(state["stem.0.weight"], ref["stem.0.weight"], rtol=0, atol=0)
