"""``medfeat doctor``: fast, never fails, says why and how for each missing piece."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from medfeat import doctor


def test_checks_cover_runtimes_devices_packages():
    start = time.perf_counter()
    rows = doctor.run_checks()
    assert time.perf_counter() - start < 10  # metadata and provider queries only
    names = {r.name for r in rows}
    assert {"eager", "compiled", "onnxruntime", "tensorrt", "cpu", "cuda", "onnx", "cupy"} <= names
    assert {r.kind for r in rows} >= {"runtime", "device", "package", "provider"}
    for row in rows:
        assert row.status in (doctor.OK, doctor.MISSING)
        if row.status == doctor.MISSING:
            assert row.why and row.how, row  # every missing item says why and how
    assert next(r for r in rows if r.name == "eager").status == doctor.OK


def test_missing_package_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(doctor, "_installed", lambda module: module != "zarr")
    row = next(r for r in doctor.check_packages() if r.name == "zarr")
    assert row.status == doctor.MISSING and row.why == "not installed" and "pip install" in row.how


def test_missing_tensorrt_and_gpu_reasons(monkeypatch):
    monkeypatch.setattr(doctor, "_version", lambda *d: None if d[0] == "tensorrt" else "1.0")
    row = next(r for r in doctor.check_runtimes() if r.name == "tensorrt")
    assert row.status == doctor.MISSING and row.why == "not installed" and "pip install tensorrt" in row.how
    monkeypatch.setattr(doctor, "_gpu_state", lambda: (False, "no NVIDIA driver", "install the driver"))
    monkeypatch.setattr(doctor, "_version", lambda *d: "10.0")
    row = next(r for r in doctor.check_runtimes() if r.name == "tensorrt")
    assert row.status == doctor.MISSING and row.why == "no NVIDIA driver"


def test_a_broken_check_becomes_a_row(monkeypatch):
    def broken() -> list:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "CHECKS", (broken,))
    rows = doctor.run_checks()
    assert rows[0].status == doctor.MISSING and "driver exploded" in rows[0].why
    assert "MISSING" in doctor.report(rows)


@pytest.mark.parametrize("args", [["doctor"], ["doctor", "--json"]])
def test_cli(args):
    from medfeat.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    if "--json" in args:
        rows = json.loads(result.output)
        assert any(r["name"] == "onnxruntime" for r in rows)
        assert any(r["kind"] == "choice" for r in rows)
    else:
        assert "runtimes:" in result.output and "auto (cpu, 3D)" in result.output
