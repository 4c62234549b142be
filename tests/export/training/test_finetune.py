"""Fine-tuning: what is frozen, where the backbone is cut, and a killed run that resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medfeat.cohorts.synth_where import synth_where_cohort
from medfeat.errors import UnknownNameError
from medfeat.export.training.finetune import FinetuneConfig, build_model, train_mode


def test_unfreeze_from_trains_only_the_later_blocks_and_the_classifier():
    model = build_model(FinetuneConfig("deit_b16", tiny=True, unfreeze_from="blocks.1"), 3)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("backbone.trunk.blocks.1.", "fc.")) for n in trained)
    assert {"fc.weight", "fc.bias"} <= trained
    assert not any("norm.weight" == n.split("trunk.")[-1] for n in trained)  # the final norm stays frozen
    full = build_model(FinetuneConfig("deit_b16", tiny=True), 3)
    assert all(p.requires_grad for p in full.parameters())


def test_cut_at_truncates_and_reads_the_normed_cls():
    model = build_model(FinetuneConfig("deit_b16", tiny=True, tap="blocks.0"), 2)
    assert len(model.backbone.trunk.blocks) == 1 and model.backbone.poolings["blocks.0"] == "norm-cls"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trunk = model.backbone.trunk
        ref = trunk.norm(trunk.forward_taps(x, ["blocks.0"])["blocks.0"])[:, 0]
        np.testing.assert_allclose(model.fc(ref).numpy(), model(x).numpy(), rtol=1e-6)
    with pytest.raises(UnknownNameError, match="unfreeze-from"):
        build_model(FinetuneConfig("deit_b16", tiny=True, tap="blocks.0", unfreeze_from="blocks.1"), 2)


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model(FinetuneConfig("resnet50", tiny=True, unfreeze_from="layer4"), 2)
    train_mode(model)
    bns = {n: m.training for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert not any(t for n, t in bns.items() if ".layer4." not in f".{n}")
    assert all(t for n, t in bns.items() if "layer4" in n)


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    from _finetune_job import job
    job({manifest!r}, {out!r}, on_epoch_end=lambda epoch, record: time.sleep(0.4))
""")


def _epoch(out) -> int:
    try:
        return int(torch.load(out / "state.pt", map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - not written yet
        return -1


def test_killed_finetune_resumes_to_the_uninterrupted_model(tmp_path):
    helpers = Path(__file__).parents[2] / "helpers"
    manifest = synth_where_cohort(tmp_path / "c", images=24, size=32, cells=3)
    killed = tmp_path / "killed"
    code = SCRIPT.format(here=str(helpers), manifest=str(manifest), out=str(killed))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    deadline = time.time() + 120
    while _epoch(killed) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped = _epoch(killed)
    assert 1 <= stopped < 3  # killed part-way, after at least one saved epoch
    from _finetune_job import job  # tests/helpers, on sys.path

    _, resumed = job(manifest, killed)
    clean_model, clean = job(manifest, tmp_path / "clean")
    assert resumed.resumed_from == stopped + 1
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in clean.history]
    from safetensors.torch import load_file

    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "clean" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
