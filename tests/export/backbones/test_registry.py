"""Invariants of every registry entry, checked on its tiny config.

Parametrised over ``list_backbones()``, so a family added to ``medfeat/export/backbones/models`` is
covered without touching this file: declared tap shapes, no NaN, truncation does not change
a tap, the plain forward equals the last tap (where the plain output is a tap), a truncated
trunk holds no parameter past its last tap, unknown taps and ill-fitting checkpoints give the
documented errors, and a checkpoint in the model's own layout round-trips.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any

import pytest
import torch

from medfeat.errors import UnknownNameError, WeightsError
from medfeat.export.backbones.pooling import pool, pooled_dim
from medfeat.export.backbones.registry import create_backbone, get_spec, list_backbones
from medfeat.export.backbones.spec import TappedModel, TapSpec

NAMES = list_backbones()
ATOL = 1e-5


def tiny_input_size(name: str, trunk: TappedModel | None = None) -> tuple[int, ...]:
    """Spatial input size for the tiny config.

    Families spell it differently: a trunk attribute ``input_size``, or a tiny-config key
    ``input_size`` / ``img_size`` / ``image_size``; otherwise the spec's real size.
    """
    spec = get_spec(name)
    ndim = len(spec.input_size)
    size: Any = getattr(trunk, "input_size", None)
    for key in ("input_size", "img_size", "image_size"):
        if size is None:
            size = spec.tiny_config.get(key)
    if size is None:
        size = spec.input_size
    return (int(size),) * ndim if isinstance(size, int) else tuple(int(s) for s in size)


def build(name: str, seed: int = 0) -> TappedModel:
    """The untruncated tiny model, seeded exactly as ``create_backbone`` seeds it."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    trunk = spec.build(**spec.tiny_config)
    return trunk.eval()


def tiny_input(name: str, trunk: TappedModel, batch: int = 1) -> torch.Tensor:
    spec = get_spec(name)
    gen = torch.Generator().manual_seed(1)
    return torch.rand(batch, spec.in_channels, *tiny_input_size(name, trunk), generator=gen)


@cache
def full_run(name: str) -> tuple[TappedModel, torch.Tensor, dict[str, torch.Tensor]]:
    """Untruncated tiny model, its input and every tap's raw output (cached per model)."""
    trunk = build(name)
    x = tiny_input(name, trunk)
    table = get_spec(name).tap_table(**get_spec(name).tiny_config)
    with torch.inference_mode():
        out = trunk.forward_taps(x, [t.name for t in table])
    return trunk, x, out


def table(name: str) -> tuple[TapSpec, ...]:
    spec = get_spec(name)
    return spec.tap_table(**spec.tiny_config)


def map_features(trunk) -> set[str]:
    """Taps computed from a network's maps (uniGradICON's S.phi.disp, S.phi.logjac), which
    ``tap_names()``, the network's own outputs, leaves out."""
    return set(trunk.feature_names()) if hasattr(trunk, "feature_names") else set()


def expected_grid(size: tuple[int, ...], reduction: int) -> list[set[int]]:
    # Strided layers round up or down depending on padding: accept either.
    return [{s // reduction, math.ceil(s / reduction)} for s in size]


@pytest.mark.parametrize("name", NAMES)
def test_declared_tap_shapes_and_finite(name: str) -> None:
    trunk, x, out = full_run(name)
    size = tiny_input_size(name, trunk)
    own = [t.name for t in table(name) if t.name not in map_features(trunk)]
    assert own == trunk.tap_names()
    for tap in table(name):
        y = out[tap.name]
        assert y.shape[0] == x.shape[0], tap.name
        if tap.kind == "map":
            assert y.ndim == 2 + len(size) and y.shape[1] == tap.channels, (tap.name, y.shape)
            for dim, ok in zip(y.shape[2:], expected_grid(size, tap.reduction)):
                assert dim in ok, (tap.name, tuple(y.shape), tap.reduction)
        elif tap.kind == "tokens":
            grid = math.prod(min(ok) for ok in expected_grid(size, tap.reduction))
            grid_hi = math.prod(max(ok) for ok in expected_grid(size, tap.reduction))
            assert y.ndim == 3 and y.shape[2] == tap.channels, (tap.name, y.shape)
            assert grid + tap.prefix_tokens <= y.shape[1] <= grid_hi + tap.prefix_tokens, (tap.name, y.shape)
        else:
            assert y.shape == (x.shape[0], tap.channels), (tap.name, y.shape)
        assert torch.isfinite(y).all(), f"{name} {tap.name} has NaN/inf"
        pooled = pool(y, tap.kind, tap.pooling, tap.prefix_tokens)
        assert pooled.shape == (x.shape[0], pooled_dim(tap.channels, tap.pooling))


def _middle_and_last(name: str) -> list[str]:
    names = [t.name for t in table(name)]
    return sorted({names[len(names) // 2], names[-1]}, key=names.index)


@pytest.mark.parametrize("name", NAMES)
def test_truncation_does_not_change_taps(name: str) -> None:
    _, x, full = full_run(name)
    for tap in _middle_and_last(name):
        spec_tap = next(t for t in table(name) if t.name == tap)
        backbone = create_backbone(name, [tap], tiny=True, seed=0)
        with torch.inference_mode():
            raw = backbone.trunk.forward_taps(x, [tap])[tap]
            pooled = backbone(x)[tap]
        torch.testing.assert_close(raw, full[tap], atol=ATOL, rtol=1e-4, msg=f"{name} {tap}")
        reference = pool(full[tap], spec_tap.kind, spec_tap.pooling, spec_tap.prefix_tokens)
        torch.testing.assert_close(pooled, reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_last_tap_equals_plain_forward(name: str) -> None:
    trunk, x, full = full_run(name)
    last = table(name)[-1].name
    with torch.inference_mode():
        plain = trunk(x)
    if not isinstance(plain, torch.Tensor) or plain.shape != full[last].shape:
        pytest.skip(f"{name}: the plain forward output is not a tap (compared tap by tap instead)")
    torch.testing.assert_close(full[last], plain, atol=ATOL, rtol=1e-4)


def _unused_parameters(trunk: TappedModel, x: torch.Tensor, taps: list[str]) -> set[str]:
    """Parameters that get no gradient when every tap in ``taps`` is computed."""
    trunk.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = trunk.forward_taps(x, taps)
        sum(v.float().mean() for v in out.values()).backward()
    return {n for n, p in trunk.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("name", NAMES)
def test_truncated_trunk_holds_nothing_past_last_tap(name: str) -> None:
    names = [t.name for t in table(name)]
    tap = names[len(names) // 2]
    full_trunk, x, _ = full_run(name)
    # Parameters the model never uses at inference (mask tokens, ...) are not "past" any tap.
    never_used = _unused_parameters(build(name), x, names)
    trunk = create_backbone(name, [tap], tiny=True).trunk
    upto = names[: names.index(tap) + 1]
    own = [n for n in upto if n not in map_features(trunk)]
    assert trunk.tap_names() == own or set(trunk.tap_names()) >= set(own)
    unused = _unused_parameters(trunk, x, upto) - never_used
    assert not unused, f"{name} pruned after {tap} still holds unused parameters: {sorted(unused)[:5]}"
    n_full = sum(p.numel() for p in full_trunk.parameters())
    n_trunc = sum(p.numel() for p in trunk.parameters())
    if tap != names[-1]:
        assert n_trunc < n_full, f"{name}: pruning after {tap} removed no parameters"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_tap_raises(name: str) -> None:
    with pytest.raises(UnknownNameError, match="no_such_tap"):
        create_backbone(name, ["no_such_tap"], tiny=True)
    with pytest.raises(UnknownNameError):
        create_backbone(name, [len(table(name))], tiny=True)


def _own_checkpoint(name: str, tmp_path, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    state = {k: v.clone() for k, v in build(name, seed).state_dict().items()}
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    return str(path), state


def _accepts_own_layout(name: str, state: dict[str, torch.Tensor]) -> bool:
    convert = get_spec(name).convert_checkpoint
    if convert is None:
        return True
    try:
        return set(convert(dict(state))) == set(state)
    except WeightsError:
        return False


@pytest.mark.parametrize("name", NAMES)
def test_own_layout_checkpoint_round_trips(name: str, tmp_path) -> None:
    path, state = _own_checkpoint(name, tmp_path, seed=0)
    if not _accepts_own_layout(name, state):
        pytest.skip(f"{name} loads only its original checkpoint layouts (tested in its family's tests)")
    _, x, full = full_run(name)
    tap = table(name)[-1].name
    backbone = create_backbone(name, [tap], weights=path, tiny=True, seed=123)  # other init, same weights
    with torch.inference_mode():
        raw = backbone.trunk.forward_taps(x, [tap])[tap]
    torch.testing.assert_close(raw, full[tap], atol=ATOL, rtol=1e-4)
    assert len(backbone.provenance["weights_sha256"]) == 64


@pytest.mark.parametrize("name", NAMES)
def test_ill_fitting_checkpoint_lists_missing_and_unexpected(name: str, tmp_path) -> None:
    _, state = _own_checkpoint(name, tmp_path)
    dropped = sorted(state)[len(state) // 2]
    bad = {k: v for k, v in state.items() if k != dropped}
    extra = "totally.unrelated.weight"
    bad[extra] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    tap = table(name)[0].name
    with pytest.raises(WeightsError) as err:
        create_backbone(name, [tap], weights=str(path), tiny=True)
    message = str(err.value)
    assert "\n" not in message and name in message
    if _accepts_own_layout(name, state):
        assert "missing" in message and "unexpected" in message, message


def test_cli_models_list_names_every_model(capsys) -> None:
    from medfeat.cli import main

    main(["models", "list"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["name", "input", "size", "channels", "taps"]
    listed = {line.split()[0]: line.split()[4] for line in out[1:]}
    assert listed == {n: str(len(get_spec(n).tap_table())) for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_cli_models_show_shapes_follow_the_tap_table(name: str, capsys) -> None:
    import json

    from medfeat.cli import main

    main(["models", "show", name, "--json"])
    shown = json.loads(capsys.readouterr().out)
    spec = get_spec(name)
    assert [r["tap"] for r in shown["taps"]] == [t.name for t in spec.tap_table()]
    for row, tap in zip(shown["taps"], spec.tap_table()):
        dims = [int(v) for v in row["raw_shape"].split("x")]
        if tap.kind == "map":
            assert dims == [tap.channels] + [math.ceil(s / tap.reduction) for s in spec.input_size]
        assert row["dim"] == pooled_dim(tap.channels, tap.pooling)


def test_cli_models_show_unknown_model_is_one_line_exit_2(capsys) -> None:
    from medfeat.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["models", "show", "no_such_model"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_such_model" in err
