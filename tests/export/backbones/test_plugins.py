"""Plugin loading: a file imported under its stem, twice harmlessly; a clash named; a broken
plugin's error names it; one name registered by two modules is refused."""
from __future__ import annotations

from pathlib import Path

import _tiny_backbone  # noqa: F401 - registers tiny3d_test
import pytest

from medfeat.errors import InputError
from medfeat.export.backbones.plugins import load_plugin
from medfeat.export.backbones.registry import get_spec, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec

BODY = '''
from medfeat.export.backbones.registry import register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec
import _tiny_backbone

register_backbone(BackboneSpec("{name}", "volume3d", (16, 16, 16), 1, Preprocess("zscore"), _tiny_backbone.TAPS,
                               build=lambda **cfg: _tiny_backbone.TinyConvNet(1, 3)))
'''


def test_file_plugin_loads_once_and_clashes_are_named(tmp_path: Path) -> None:
    a = tmp_path / "a" / "lab_plugin_x.py"
    a.parent.mkdir()
    a.write_text(BODY.format(name="plugin_x_net"))
    assert load_plugin(str(a)).module == "lab_plugin_x"
    assert load_plugin(str(a)).file == str(a.resolve())  # again: no second import, no error
    assert get_spec("plugin_x_net").input_kind == "volume3d"
    b = tmp_path / "b" / "lab_plugin_x.py"
    b.parent.mkdir()
    b.write_text(BODY.format(name="plugin_y_net"))
    with pytest.raises(InputError, match="already imported from elsewhere"):
        load_plugin(str(b))
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(InputError, match="broken_plugin.py: import failed .RuntimeError: no GPU here"):
        load_plugin(str(broken))
    with pytest.raises(InputError, match="import failed"):
        load_plugin("no_such_plugin_module_x")


def test_one_name_from_two_modules_is_refused() -> None:
    spec = get_spec("tiny3d_test")
    other = BackboneSpec("tiny3d_test", "volume3d", (16, 16, 16), 1, Preprocess("zscore"), (TapSpec("a", 1),),
                         build=lambda **cfg: None)  # defined here, not in the module that registered it
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone(other)
    assert get_spec("tiny3d_test") is spec
