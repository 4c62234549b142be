"""Building the MONAI-layout backbones imports nothing of MONAI (nor torchvision, nor dynamo).

``import monai`` (any ``monai.networks`` module) runs ``monai/__init__.py``, which imports
``monai.apps``, torchvision and ``torch._dynamo``: seconds of start-up. The task UNet and
SwinUNETR are written in plain torch (``medfeat/export/backbones/models/monai_blocks.py``,
``swin_net.py``). Checked in a fresh interpreter, since this test process may long have
imported MONAI; the same interpreter then imports MONAI in full and checks that its UNet and
SwinUNETR, seeded alike, have our weights and give our outputs bit for bit.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import torch
from medfeat.export.backbones.registry import create_backbone

built = {name: create_backbone(name, [tap], seed=3, tiny=True)
         for name, tap in (("unet3d", "up.0"), ("swin_unetr_encoder", "swinViT.4"), ("swin_unetr", "encoder10"))}
x = {"unet3d": torch.rand(1, 1, 16, 16, 16), "swin": torch.rand(1, 1, 32, 32, 32)}
with torch.no_grad():
    feats = {n: b(x["unet3d" if n == "unet3d" else "swin"]) for n, b in built.items()}
watched = ("monai", "torchvision", "torch._dynamo")
loaded = sorted(m for m in sys.modules if any(m == w or m.startswith(w + ".") for w in watched))

import monai  # the whole package, after ours: both must live in one process
from monai.networks.nets import SwinUNETR, UNet

torch.manual_seed(3)
unet = UNet(spatial_dims=3, in_channels=1, out_channels=6, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
torch.manual_seed(3)
swin = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(2, 1, 1, 1), window_size=4,
                 norm_name="batch").eval()
ours_unet, ours_swin = built["unet3d"].trunk, built["swin_unetr_encoder"].trunk
with torch.no_grad():
    same = {
        "unet3d weights": all(torch.equal(v, unet.state_dict()[k]) for k, v in ours_unet.state_dict().items()),
        "unet3d logits": torch.equal(unet(x["unet3d"]), ours_unet(x["unet3d"])),
        "swin weights": all(torch.equal(v, swin.swinViT.state_dict()[k.removeprefix("swinViT.")])
                            for k, v in ours_swin.state_dict().items()),
        "swin state 4": torch.equal(swin.swinViT(x["swin"], True)[4], ours_swin(x["swin"])),
    }
print(json.dumps({"loaded": loaded, "same": same, "monai": monai.__version__}))
"""


@pytest.mark.slow
def test_building_monai_layout_backbones_imports_no_monai() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["loaded"] == [], f"building unet3d / swin_unetr imported {out['loaded'][:10]}"
    assert all(out["same"].values()), out["same"]
