"""Make the parity fixtures of the families whose upstream code installs from no package index.

Run once per upstream repository, with a local clone (or bare mirror) of it::

    python tests/parity/make_fixtures.py blip   --repo PATH/salesforce/BLIP
    python tests/parity/make_fixtures.py seem   --repo PATH/UX-Decoder/Segment-Everything-Everywhere-All-At-Once
    python tests/parity/make_fixtures.py dinov2 --repo PATH/facebookresearch/dinov2
    python tests/parity/make_fixtures.py dino   --repo PATH/facebookresearch/dino

BLIP's file imports ``fairscale`` (pip install it first). Each command extracts the upstream file(s) at the repository's HEAD (or ``--commit``) into a
temporary folder outside this repository, imports them from there, builds the upstream module
with seeded random weights (every parameter perturbed, so zero-initialised layer scales and
the like matter), runs it on small seeded inputs and writes ``tests/parity/fixtures/<name>.safetensors``:
the module's state dict in upstream's own key names, the inputs, upstream's outputs at every
tap, and the repository, commit, file and build arguments. ``test_parity_fixtures.py`` loads
the state dict in the released checkpoint's layout through ``create_backbone`` and compares.
No upstream code is copied into this repository; imports of upstream code that the compared
module never runs (detectron2's registry and file I/O for SEEM) are stood in for by empty
placeholders, named below.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from parity_common import randomize, seeded_input, write_fixture  # noqa: E402

UPSTREAM = {
    "blip": ("salesforce/BLIP", ["models/vit.py"]),
    "seem": ("UX-Decoder/Segment-Everything-Everywhere-All-At-Once", ["modeling/vision/backbone/focal_dw.py"]),
    "dinov2": ("facebookresearch/dinov2", ["dinov2/layers", "dinov2/models/vision_transformer.py"]),
    "dino": ("facebookresearch/dino", ["vision_transformer.py", "utils.py"]),
}


def extract(repo: Path, commit: str, paths: list[str], into: Path) -> str:
    """Write ``paths`` of ``repo`` at ``commit`` under ``into``; return the full commit hash."""
    git = ["git", f"--git-dir={_git_dir(repo)}"]
    full = subprocess.run([*git, "rev-parse", f"{commit}^{{commit}}"], check=True, capture_output=True,
                          text=True).stdout.strip()
    archive = subprocess.run([*git, "archive", full, *paths], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return full


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def load_file(path: Path, name: str, package: str | None = None) -> types.ModuleType:
    """Import the upstream file at ``path`` as module ``name`` (in ``package`` when given)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def meta(key: str, commit: str, build: dict, **more: object) -> dict:
    repo, files = UPSTREAM[key]
    return {"upstream": f"github.com/{repo}", "commit": commit, "files": files, "build": build,
            "made_by": "tests/parity/make_fixtures.py", **more}


# --------------------------------------------------------------------------- BLIP


def make_blip(repo: Path, commit: str, tmp: Path) -> None:
    """BLIP's ViT (``models/vit.py``; BLIP ViT-B/16 is ``VisionTransformer(224, 16, 768, 12, 12)``),
    here 32 px, width 32, depth 2, 2 heads; taps blocks.0-1 (raw tokens) and norm."""
    full = extract(repo, commit, UPSTREAM["blip"][1], tmp)
    vit = load_file(tmp / "models" / "vit.py", "blip_vit")
    build = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
                 drop_path_rate=0.0)
    torch.manual_seed(0)
    model = randomize(vit.VisionTransformer(**build), seed=1)
    inputs = {"x32": seeded_input(2, 3, 32, 32, seed=2)}
    refs = {}
    for key, x in inputs.items():
        taps: dict[str, torch.Tensor] = {}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i, taps=taps: taps.__setitem__(f"blocks.{i}", o))
                 for i, b in enumerate(model.blocks)]
        with torch.no_grad():
            taps["norm"] = model(x)  # BLIP's forward ends with the final norm
        for h in hooks:
            h.remove()
        refs[key] = taps
    write_fixture("blip_vitb16", model.state_dict(), inputs, refs, meta("blip", full, build, cls="VisionTransformer"))


# --------------------------------------------------------------------------- SEEM FocalNet (focal_dw)


def _seem_placeholders() -> None:
    """focal_dw.py imports detectron2's backbone registry and file I/O, used only by
    ``D2FocalNet`` / ``get_focal_backbone`` (not built here), and ``.build.register_backbone``."""
    d2 = types.ModuleType("detectron2")
    utils, file_io = types.ModuleType("detectron2.utils"), types.ModuleType("detectron2.utils.file_io")
    modeling = types.ModuleType("detectron2.modeling")
    file_io.PathManager = None
    modeling.BACKBONE_REGISTRY = None
    modeling.Backbone = type("Backbone", (nn.Module,), {})
    modeling.ShapeSpec = None
    sys.modules.update({"detectron2": d2, "detectron2.utils": utils, "detectron2.utils.file_io": file_io,
                        "detectron2.modeling": modeling})
    package = types.ModuleType("seem_backbone")
    package.__path__ = []
    build = types.ModuleType("seem_backbone.build")
    build.register_backbone = lambda fn: fn
    sys.modules.update({"seem_backbone": package, "seem_backbone.build": build})


def make_seem(repo: Path, commit: str, tmp: Path) -> None:
    """SEEM's FocalNet (``focal_dw.py``) with ``focalt_unicl_lang_v0.yaml``'s switches (conv
    embedding, post-LN, scaling modulator, layer scale, focal levels/windows 3), narrow and
    shallow; inputs at a multiple of 32 and at 70 x 90 (padded at every stage)."""
    full = extract(repo, commit, UPSTREAM["seem"][1], tmp)
    _seem_placeholders()
    focal = load_file(tmp / "modeling" / "vision" / "backbone" / "focal_dw.py", "seem_backbone.focal_dw",
                      package="seem_backbone")
    build = dict(pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=8, depths=[2, 1, 2, 1], mlp_ratio=4.0,
                 drop_rate=0.0, drop_path_rate=0.3, patch_norm=True, out_indices=[0, 1, 2, 3],
                 focal_levels=[3, 3, 3, 3], focal_windows=[3, 3, 3, 3], use_conv_embed=True, use_postln=True,
                 use_postln_in_modulation=False, scaling_modulator=True, use_layerscale=True)
    torch.manual_seed(0)
    model = randomize(focal.FocalNet(norm_layer=nn.LayerNorm, **build), seed=3)
    inputs = {"x64": seeded_input(2, 3, 64, 64, seed=4), "x70x90": seeded_input(1, 3, 70, 90, seed=5)}
    with torch.no_grad():
        refs = {key: model(x) for key, x in inputs.items()}  # {"res2": ..., "res5": ...}
    write_fixture("seem_focalt", model.state_dict(), inputs, refs,
                  meta("seem", full, build, cls="FocalNet", placeholders="detectron2 registry/file I/O, .build"))


# --------------------------------------------------------------------------- DINOv2 (original code)


def make_dinov2(repo: Path, commit: str, tmp: Path) -> None:
    """``DinoVisionTransformer`` as the hub builds it (``_make_dinov2_model``: layer-scale init 1,
    ``interpolate_offset`` 0.1, no antialias, no registers), at 28 px with 2 blocks: an MLP
    model (as ViT-S/B/L) and a SwiGLU one with chunked blocks (as ViT-g's training
    checkpoints). Taps blocks.* (raw tokens) and norm; inputs at the native 2 x 2 grid and
    at 4 x 4 (position embeddings resampled with the offset)."""
    full = extract(repo, commit, UPSTREAM["dinov2"][1], tmp)
    sys.path.insert(0, str(tmp))
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    for name, ffn, chunks, width in (("dinov2_hub_vits14", "mlp", 0, 32), ("dinov2_hub_vitg14", "swiglufused", 2, 48)):
        build = dict(img_size=28, patch_size=14, embed_dim=width, depth=2, num_heads=2, mlp_ratio=4, init_values=1.0,
                     ffn_layer=ffn, block_chunks=chunks, num_register_tokens=0, interpolate_antialias=False,
                     interpolate_offset=0.1)
        torch.manual_seed(0)
        model = randomize(DinoVisionTransformer(block_fn=partial(Block, attn_class=MemEffAttention), **build), seed=6)
        inputs = {"x28": seeded_input(2, 3, 28, 28, seed=7), "x56": seeded_input(2, 3, 56, 56, seed=8)}
        refs = {}
        for key, x in inputs.items():
            with torch.no_grad():
                blocks = model.get_intermediate_layers(x, n=build["depth"], return_class_token=True, norm=False)
                normed = model.forward_features(x)
            taps = {f"blocks.{i}": torch.cat([cls[:, None], patches], 1) for i, (patches, cls) in enumerate(blocks)}
            taps["norm"] = torch.cat([normed["x_norm_clstoken"][:, None], normed["x_norm_patchtokens"]], 1)
            refs[key] = taps
        write_fixture(name, model.state_dict(), inputs, refs,
                      meta("dinov2", full, build, cls="DinoVisionTransformer", block_fn="Block + MemEffAttention"))


# --------------------------------------------------------------------------- DINO (original code)


def make_dino(repo: Path, commit: str, tmp: Path) -> None:
    """DINO's ``VisionTransformer`` (``vit_base``'s settings: qkv bias, LayerNorm eps 1e-6) at
    32 px, width 32, depth 2; inputs at the native 2 x 2 grid and at 4 x 4 (DINO's
    position-embedding interpolation with its 0.1 offset)."""
    full = extract(repo, commit, UPSTREAM["dino"][1], tmp)
    sys.path.insert(0, str(tmp))
    vit = load_file(tmp / "vision_transformer.py", "dino_vision_transformer")
    build = dict(img_size=[32], patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, qkv_bias=True)
    torch.manual_seed(0)
    model = randomize(vit.VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), **build), seed=9)
    inputs = {"x32": seeded_input(2, 3, 32, 32, seed=10), "x64": seeded_input(2, 3, 64, 64, seed=11)}
    refs = {}
    for key, x in inputs.items():
        taps: dict[str, torch.Tensor] = {}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i, taps=taps: taps.__setitem__(f"blocks.{i}", o))
                 for i, b in enumerate(model.blocks)]
        with torch.no_grad():
            taps["norm"] = model.get_intermediate_layers(x, n=1)[0]  # the last block, normed (all tokens)
            cls = model(x)
        for h in hooks:
            h.remove()
        assert torch.equal(cls, taps["norm"][:, 0])
        refs[key] = taps
    write_fixture("dino_vitb16", model.state_dict(), inputs, refs, meta("dino", full, build, cls="VisionTransformer"))


MAKERS = {"blip": make_blip, "seem": make_seem, "dinov2": make_dinov2, "dino": make_dino}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(MAKERS))
    parser.add_argument("--repo", type=Path, required=True, help="clone or bare mirror of the upstream repository")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        MAKERS[args.family](args.repo, args.commit, Path(tmp))


if __name__ == "__main__":
    main()
