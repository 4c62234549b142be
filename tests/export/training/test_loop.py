"""The study's training loop: warm-up, weight-decay groups, best-epoch selection, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfeat.errors import InputError
from medfeat.export.training.loop import ETA_MIN, Trainer, TrainSettings, param_groups, resolve_device, warmup_factor


def test_warmup_is_linear_from_eta_min_then_constant():
    lr, w = 1e-4, 1000
    assert warmup_factor(0, w, lr) * lr == pytest.approx(ETA_MIN)
    assert warmup_factor(500, w, lr) * lr == pytest.approx(ETA_MIN + (lr - ETA_MIN) / 2)
    assert warmup_factor(w, w, lr) == warmup_factor(10 * w, w, lr) == 1.0
    assert warmup_factor(0, 0, lr) == 1.0


def test_weight_decay_skips_biases_norms_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[2].weight.requires_grad = False
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    return x, (x[:, 0] + 0.3 * torch.randn(64, generator=g) > 0).long()


def _trainer(state_dir=None, epochs=5, **kw) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.GELU(), nn.Linear(8, 2))
    settings = TrainSettings(lr=1e-2, batch_size=16, epochs=epochs, warmup_iters=4, device="cpu", **kw)
    return Trainer(model, nn.functional.cross_entropy, settings, state_dir=state_dir, config={"task": "t"})


def _batches(x, y):
    def make(epoch):
        order = np.random.default_rng([0, epoch]).permutation(len(x))
        return [(x[order[i:i + 16]], y[order[i:i + 16]]) for i in range(0, len(x), 16)]
    return make


def _score(x, y):
    def score(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    return score


def test_keeps_the_best_epoch_not_the_last():
    x, y = _data()
    trainer = _trainer(epochs=4)
    scores, states = iter([0.5, 0.9, 0.7, 0.6]), []
    result = trainer.fit(_batches(x, y), lambda m: next(scores),
                         on_epoch_end=lambda e, r: states.append({k: v.clone() for k, v in trainer.model.state_dict().items()}))
    assert result.best_epoch == 1 and result.best_score == 0.9 and len(result.history) == 4
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, states[1][k])


def test_patience_stops_early():
    x, y = _data()
    scores = iter([0.9, 0.1, 0.1, 0.1, 0.1])
    result = _trainer(epochs=5, patience=2).fit(_batches(x, y), lambda m: next(scores))
    assert len(result.history) == 3 and result.best_epoch == 0


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Stopped after epoch 2's state is written, then run again: same weights, history and
    best epoch as a run never stopped (bit for bit on the CPU: batches, dropout RNG and
    optimiser state all restored)."""
    x, y = _data()
    clean = _trainer(tmp_path / "clean")
    ref = clean.fit(_batches(x, y), _score(x, y))

    def crash(epoch, record):
        if epoch == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _trainer(tmp_path / "cut").fit(_batches(x, y), _score(x, y), on_epoch_end=crash)
    resumed = _trainer(tmp_path / "cut")
    out = resumed.fit(_batches(x, y), _score(x, y))
    assert out.resumed_from == 3
    assert [h["train_loss"] for h in out.history] == [h["train_loss"] for h in ref.history]
    assert out.best_epoch == ref.best_epoch
    for k, v in clean.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert len(list((tmp_path / "cut").glob("best-e*.pt"))) == 1


def test_resume_with_another_configuration_is_refused(tmp_path):
    x, y = _data()
    _trainer(tmp_path / "s", epochs=1).fit(_batches(x, y), _score(x, y))
    with pytest.raises(InputError, match="another configuration"):
        _trainer(tmp_path / "s", epochs=2, grad_clip=0.5).fit(_batches(x, y), _score(x, y))
    _trainer(tmp_path / "s", epochs=2).fit(_batches(x, y), _score(x, y))  # more epochs: a resume


def test_bad_settings_and_missing_gpu_are_one_line_errors():
    with pytest.raises(InputError, match="lr"):
        TrainSettings(lr=0)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
