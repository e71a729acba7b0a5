"""The pathology foundation models registered after UNI/H-optimus-0: UNI2-h, Virchow2, H-optimus-1, H0-mini and
the Prov-GigaPath tile encoder.

Each is checked against its *published* construction, written out here independently of the zoo (the timm
name and keyword arguments the model card / TRIDENT use): the full-size architecture on the meta device (no
memory, every run), a shrunk-depth copy through deepspot's real file loader (every run), and the full-size
model with random weights through the same loader (``-m slow``).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deepspot.features import encoders as E
from deepspot.features.encoders import EncoderError, get_spec, load_encoder
from deepspot.features.encoders import zoo

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def _swiglu():
    import timm

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


# name -> (timm name, published kwargs, output rule, prefix tokens (CLS + registers), dim, mean/std, HF repo,
#          published parameter count or None)
PUBLISHED = {
    "uni2-h": ("vit_giant_patch14_224",
               lambda: dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
                            dynamic_img_size=True, **_swiglu()),
               "cls", 9, 1536, IMAGENET, "MahmoodLab/UNI2-h", 681e6),
    "virchow2": ("vit_huge_patch14_224",
                 lambda: dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                              global_pool="", dynamic_img_size=True, **_swiglu()),
                 "cls+mean", 5, 2560, IMAGENET, "paige-ai/Virchow2", 632e6),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2",
                  lambda: dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5,
                               dynamic_img_size=False),
                  "cls", 5, 1536, BIOPTIMUS, "bioptimus/H-optimus-1", 1.13e9),
    "h0-mini": ("vit_base_patch14_reg4_dinov2",
                lambda: dict(img_size=224, num_classes=0, **_swiglu()),
                "cls+mean", 5, 1536, BIOPTIMUS, "bioptimus/H0-mini", None),
    "gigapath": ("vit_giant_patch14_dinov2",
                 lambda: dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                              init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
                 "cls", 1, 1536, IMAGENET, "prov-gigapath/prov-gigapath", 1.13e9),
}
NAMES = sorted(PUBLISHED)
GIANT = {"uni2-h", "virchow2", "hoptimus1", "gigapath"}




def _published(name: str, depth: int | None = None, seed: int = 0) -> torch.nn.Module:
    """The release's construction (``global_pool=""`` for the CLS+mean models, whose card slices all tokens)."""
    import timm

    arch, kwargs, rule = PUBLISHED[name][:3]
    kw = kwargs()
    if depth is not None:
        kw["depth"] = depth
    if rule == "cls+mean":
        kw["global_pool"] = ""
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **kw).eval()


def _reference(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model card computes: the CLS token, or CLS concatenated with the mean of the patch tokens
    (everything after the CLS and register tokens)."""
    rule, prefix = PUBLISHED[name][2:4]
    with torch.no_grad():
        out = model(x)
    if rule == "cls":
        return out
    return torch.cat([out[:, 0], out[:, prefix:].mean(1)], dim=-1)


def _shrunk_spec(name: str, depth: int):
    """The registered spec with its own construction at ``depth`` blocks, bound to its own builder."""
    spec = get_spec(name)
    kw = dict(spec.builder.keywords)
    if "trunk" in kw:
        kw["trunk"] = partial(kw["trunk"], depth=depth)
        arch = partial(lambda wrap, trunk: wrap(trunk()), kw["wrap"], kw["trunk"])
    else:
        arch = partial(spec.arch, depth=depth)
    small = dataclasses.replace(spec, name=f"{name}-depth{depth}", arch=arch)
    return zoo._bind(small, spec.builder.func, **kw)


def _tiles(n=2, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the registry entries


@pytest.mark.parametrize("name", NAMES)
def test_spec_constants_as_published(name):
    s = get_spec(name)
    dim, (mean, std), repo = PUBLISHED[name][4:7]
    assert (s.dim, s.input_size, tuple(s.mean), tuple(s.std), s.hf_repo) == (dim, 224, mean, std, repo)
    assert s.needs_download and s.gated and s.licence
    assert ("mean of patch tokens" in s.output) == (PUBLISHED[name][2] == "cls+mean")


@pytest.mark.parametrize("name", NAMES)
def test_full_architecture_is_the_published_one(name):
    """Every tensor name and shape of the registered full-size architecture equals the published construction's
    (built on the meta device: no memory), and the parameter count is the one the model card states."""
    with torch.device("meta"):
        ours = get_spec(name).arch()
        ref = _published(name)
    trunk = ours.vit if isinstance(ours, E.ClsMeanPatch) else ours
    assert _shapes(trunk) == _shapes(ref)
    assert trunk.num_prefix_tokens == PUBLISHED[name][3]
    assert ours.num_features == PUBLISHED[name][4]
    n = sum(p.numel() for p in trunk.parameters())
    if PUBLISHED[name][7] is not None:
        assert n == pytest.approx(PUBLISHED[name][7], rel=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_missing_weights_names_file_and_repo(name, no_weights_anywhere):
    with pytest.raises(EncoderError) as ei:
        load_encoder(name)
    msg = str(ei.value)
    for part in (get_spec(name).hf_repo, "pytorch_model.bin", "--encoder-weights", E.WEIGHTS_DIR_ENV, "gated"):
        assert part in msg, part


# ---------------------------------------------------------------- through the real file loader (shrunk depth)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["pytorch_model.bin", "model.safetensors"])
def test_release_file_loads_and_matches_timm(name, layout, temp_encoder, tmp_path):
    """A state dict saved as the release saves it (timm's own key names, no prefix) loads through deepspot's
    loader, and deepspot's features are the model card's output of the timm model itself."""
    depth = 2
    src = _published(name, depth=depth)
    sd = src.state_dict()
    if layout == "pytorch_model.bin":
        torch.save(sd, tmp_path / layout)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / layout))
    spec = _shrunk_spec(name, depth)
    if layout not in spec.files:
        pytest.skip(f"{name} is published as {spec.files[0]} only")
    enc = load_encoder(temp_encoder(spec), weights=tmp_path)
    tiles = _tiles(2)
    got = enc.encode(tiles)
    assert got.shape == (2, PUBLISHED[name][4])
    want = _reference(name, src, enc.preprocess(tiles))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the output rule is not a no-op: a different tile gives different features
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("name", ["virchow2", "h0-mini"])
def test_cls_mean_models_leave_registers_out(name, temp_encoder, tmp_path):
    """The second half of a CLS+mean feature is the mean over patch tokens only: adding the register tokens
    to the mean would give a different vector."""
    src = _published(name, depth=1)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    enc = load_encoder(temp_encoder(_shrunk_spec(name, 1)), weights=tmp_path / "pytorch_model.bin")
    x = enc.preprocess(_tiles(1))
    with torch.no_grad():
        tokens = src(x)
    got = enc.encode(_tiles(1))
    d = tokens.shape[-1]
    torch.testing.assert_close(got[0, d:], tokens[0, 5:].mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0, d:], tokens[0, 1:].mean(0), atol=1e-4)
    with pytest.raises(EncoderError, match="without --fast"):
        enc.forward_tokens(x)


@pytest.mark.parametrize("name", ["uni2-h", "hoptimus1", "gigapath"])
def test_cls_models_give_patch_tokens_for_fast_mode(name, temp_encoder, tmp_path):
    src = _published(name, depth=1)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    enc = load_encoder(temp_encoder(_shrunk_spec(name, 1)), weights=tmp_path / "pytorch_model.bin")
    x = enc.preprocess(_tiles(1))
    cls, tok = enc.forward_tokens(x)
    grid = 224 // (16 if name == "gigapath" else 14)
    assert tok.shape == (1, grid, grid, enc.dim)
    torch.testing.assert_close(cls, _reference(name, src, x), atol=1e-5, rtol=1e-5)


def test_a_file_of_another_model_is_refused(temp_encoder, tmp_path):
    """H-optimus-1 weights given for UNI2-h (both ViT-g-wide, different layouts) fail with a clear message."""
    torch.save(_published("hoptimus1", depth=2).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError, match="does not fit encoder 'uni2-h-depth2'"):
        load_encoder(temp_encoder(_shrunk_spec("uni2-h", 2)), weights=tmp_path / "pytorch_model.bin")


def test_encoders_command_lists_licence_and_gating():
    from deepspot.cli import app, spots  # noqa: F401 - spots adds the `encoders` command to app

    res = CliRunner().invoke(app, ["encoders"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    rows = {ln.split("│")[1].strip(): ln for ln in res.output.splitlines() if ln.count("│") > 3}
    for name in NAMES + ["uni", "efficientnet-lite0"]:
        assert name in rows, name
    assert "CC-BY-NC-ND-4.0" in rows["virchow2"] and "yes" in rows["virchow2"]
    assert "Apache-2.0" in rows["gigapath"]
    assert "Apache-2.0" in rows["efficientnet-lite0"] and "│ no" in rows["efficientnet-lite0"]


# ---------------------------------------------------------------- full size (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_size_random_weights_through_the_loader(name, tmp_path, request):
    if name in GIANT and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("giant architecture: run with -m slow")
    src = _published(name)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    enc = load_encoder(name, weights=tmp_path / "pytorch_model.bin")
    del tmp_path
    tiles = _tiles(1)
    got = enc.encode(tiles)
    assert got.shape == (1, get_spec(name).dim) and torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(name, src, enc.preprocess(tiles)), atol=1e-4, rtol=1e-4)


def test_a_release_of_another_mlp_width_is_a_size_mismatch(temp_encoder, tmp_path):
    """The one setting not read from a config file (H0-mini's MLP width) cannot load wrongly in silence: a file
    whose MLP is wider is refused with the tensor that does not fit."""
    import timm

    wide = timm.create_model("vit_base_patch14_reg4_dinov2", img_size=224, depth=2, num_classes=0, mlp_ratio=8,
                             **_swiglu())
    torch.save(wide.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError, match="size mismatch.*mlp.fc1"):
        load_encoder(temp_encoder(_shrunk_spec("h0-mini", 2)), weights=tmp_path / "pytorch_model.bin")
