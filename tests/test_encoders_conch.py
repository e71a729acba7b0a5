"""CONCH v1.5 (the vision tower TITAN's ``return_conch()`` and TRIDENT's ``conch_v15`` build).

The release's layout is written out here independently of the zoo, from the public model code (TITAN's
``conch_v1_5.py`` / TRIDENT's ``model_zoo/conchv1_5/conchv1_5.py``): every tensor name and shape of the
released state dict, and the forward pass as plain tensor algebra over that state dict (:func:`_reference`).
A state dict of random values under those names is saved as the release names its file, loaded strictly
through deepspot's loader, and deepspot's features must equal the reference's: shrunk depth on every run,
the full 24 blocks under ``-m slow``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from deepspot.features import encoders as E
from deepspot.features.encoders import EncoderError, get_spec, load_encoder
from deepspot.features.encoders import conch, zoo

NAME = "conch-v1.5"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FILES = ("pytorch_model_vision.bin", "conch_v1_5_pytorch_model.bin")
WIDTH, HEADS, POOL_DIM, POOL_HEADS, GRID = 1024, 16, 768, 8, 14


def released_shapes(depth: int = 24) -> dict[str, tuple]:
    """Every key of the released state dict and its shape: a ViT-L/16 trunk built at 224 px (position
    embedding of 14x14 patches + CLS), LayerScale in every block, the attentional pooler (1 query of 768,
    keys/values from 1024) and the final LayerNorm of 768."""
    d, h = WIDTH, 4 * WIDTH
    out = {"trunk.cls_token": (1, 1, d), "trunk.pos_embed": (1, GRID * GRID + 1, d),
           "trunk.patch_embed.proj.weight": (d, 3, 16, 16), "trunk.patch_embed.proj.bias": (d,)}
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        out.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                    b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                    b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                    b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (d, h),
                    b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
    p = POOL_DIM
    out.update({"trunk.norm.weight": (d,), "trunk.norm.bias": (d,),
                "attn_pool_contrast.query": (1, p), "attn_pool_contrast.ln_q.weight": (p,),
                "attn_pool_contrast.ln_q.bias": (p,), "attn_pool_contrast.ln_k.weight": (d,),
                "attn_pool_contrast.ln_k.bias": (d,), "attn_pool_contrast.to_q.weight": (p, p),
                "attn_pool_contrast.to_kv.weight": (2 * p, d), "attn_pool_contrast.to_out.weight": (p, p),
                "ln_contrast.weight": (p,), "ln_contrast.bias": (p,)})
    return out


def released_state_dict(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values under the released names (norm scales near 1, LayerScale near 0.1, so no part is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in released_shapes(depth).items():
        r = torch.randn(shape, generator=g)
        if k.endswith("gamma"):
            r = 0.1 + 0.02 * r
        elif ("norm" in k or "ln_" in k) and k.endswith("weight"):
            r = 1.0 + 0.1 * r
        elif k.endswith(("pos_embed", "query")):
            r = 0.5 * r
        else:
            r = 0.02 * r
        sd[k] = r
    return sd


def _reference(sd: dict, x: torch.Tensor, depth: int, size_based_resize: bool = False) -> torch.Tensor:
    """The release's forward as tensor algebra over its state dict: patch embedding, CLS, position embedding
    resized DINO-style (bicubic, scale factor (grid + 0.1) / 14), pre-norm blocks with LayerScale (LayerNorm
    eps 1e-6, exact GELU), final norm; attentional pooler over all tokens (LayerNorm eps 1e-5 on queries and
    tokens, 8 heads of 96, no biases), its single query's output, LayerNorm. ``size_based_resize``: resize the
    position embedding to the grid size instead (what timm's dynamic image size does), for the test that
    shows the difference is seen."""
    t = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    p = {k[len("attn_pool_contrast."):]: v for k, v in sd.items() if k.startswith("attn_pool_contrast.")}
    x = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=16)
    b, d, rows, cols = x.shape
    x = x.flatten(2).transpose(1, 2)
    grid = t["pos_embed"][:, 1:].reshape(1, GRID, GRID, d).permute(0, 3, 1, 2)
    if size_based_resize:
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic")
    else:
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / GRID, (cols + 0.1) / GRID), mode="bicubic")
    pos = torch.cat([t["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, d)], dim=1)
    z = torch.cat([t["cls_token"].expand(b, 1, d), x], dim=1) + pos
    n, hd = z.shape[1], d // HEADS
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in t.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(z, (d,), w["norm1.weight"], w["norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, n, d), w["attn.proj.weight"], w["attn.proj.bias"])
        z = z + w["ls1.gamma"] * a
        y = F.layer_norm(z, (d,), w["norm2.weight"], w["norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        z = z + w["ls2.gamma"] * y
    z = F.layer_norm(z, (d,), t["norm.weight"], t["norm.bias"], eps=1e-6)
    kv = F.linear(F.layer_norm(z, (d,), p["ln_k.weight"], p["ln_k.bias"]), p["to_kv.weight"])
    keys, values = kv[..., :POOL_DIM], kv[..., POOL_DIM:]
    q = F.linear(F.layer_norm(p["query"], (POOL_DIM,), p["ln_q.weight"], p["ln_q.bias"]), p["to_q.weight"])
    ph = POOL_DIM // POOL_HEADS
    qh = q.reshape(1, POOL_HEADS, ph).transpose(0, 1)  # (heads, 1, ph)
    kh = keys.reshape(b, n, POOL_HEADS, ph).permute(0, 2, 1, 3)  # (b, heads, n, ph)
    vh = values.reshape(b, n, POOL_HEADS, ph).permute(0, 2, 1, 3)
    attn = torch.einsum("hqd,bhnd->bhqn", qh, kh) * ph ** -0.5
    out = torch.einsum("bhqn,bhnd->bhqd", attn.softmax(-1), vh)  # (b, heads, 1, ph)
    pooled = F.linear(out.permute(0, 2, 1, 3).reshape(b, POOL_DIM), p["to_out.weight"])
    return F.layer_norm(pooled, (POOL_DIM,), sd["ln_contrast.weight"], sd["ln_contrast.bias"])


def _shrunk_spec(depth: int):
    spec = get_spec(NAME)
    small = dataclasses.replace(spec, name=f"{NAME}-depth{depth}", arch=lambda: conch.Conch15(depth))
    return zoo._bind(small, conch._build_conch15, depth=depth)


def _tiles(n=2, size=448, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- the registry entry and the architecture


def test_spec_as_published():
    s = get_spec(NAME)
    assert (s.dim, s.input_size, tuple(s.mean), tuple(s.std)) == (768, 448, *IMAGENET)
    assert s.hf_repo == "MahmoodLab/conchv1_5" and set(FILES) <= set(s.files)
    assert s.needs_download and s.gated and s.licence == "CC-BY-NC-ND-4.0"
    assert "attentional pooler" in s.output


def test_full_architecture_has_the_released_keys_and_shapes():
    """The registered full-size model (meta device: no memory) holds exactly the released state dict's
    tensors, so a released file loads strictly."""
    with torch.device("meta"):
        ours = get_spec(NAME).arch()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == released_shapes(24)
    assert ours.num_features == 768
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(int(np.prod(s)) for s in released_shapes(24).values())
    assert n == pytest.approx(306.1e6, rel=0.01)  # ViT-L/16 (~303 M) + the pooler and its norm


# ---------------------------------------------------------------- through the real file loader (shrunk depth)


@pytest.mark.parametrize("filename", FILES)
def test_release_file_loads_strictly_and_gives_the_reference_features(filename, temp_encoder, tmp_path):
    depth = 2
    sd = released_state_dict(depth)
    torch.save(sd, tmp_path / filename)
    enc = load_encoder(temp_encoder(_shrunk_spec(depth)), weights=tmp_path)  # a folder: found by file name
    tiles = _tiles(2)
    got = enc.encode(tiles)
    assert got.shape == (2, 768)
    x = enc.preprocess(tiles)
    assert x.shape == (2, 3, 448, 448)
    with torch.no_grad():
        want = _reference(sd, x, depth)
        size_based = _reference(sd, x, depth, size_based_resize=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # different tiles, different features
    # the release's scale-factor resize of the position embedding is what is computed, not a size-based one
    assert (got - size_based).abs().max() > 1e-3


def test_a_file_with_a_missing_or_extra_key_or_another_grid_is_refused(temp_encoder, tmp_path):
    spec = _shrunk_spec(1)
    name = temp_encoder(spec)
    sd = released_state_dict(1)
    f = tmp_path / FILES[0]
    torch.save({k: v for k, v in sd.items() if k != "ln_contrast.weight"}, f)
    with pytest.raises(EncoderError, match=r"does not fit encoder .*1 missing keys.*ln_contrast\.weight"):
        load_encoder(name, weights=f)
    torch.save({**sd, "trunk.head.weight": torch.zeros(2, WIDTH)}, f)
    with pytest.raises(EncoderError, match=r"1 unexpected.*trunk\.head\.weight"):
        load_encoder(name, weights=f)
    torch.save({**sd, "trunk.pos_embed": torch.zeros(1, 28 * 28 + 1, WIDTH)}, f)  # a 448-px grid: not the release's
    with pytest.raises(EncoderError, match=r"size mismatch.*trunk\.pos_embed"):
        load_encoder(name, weights=f)


def test_missing_weights_names_the_files_and_repos(no_weights_anywhere):
    with pytest.raises(EncoderError) as ei:
        load_encoder(NAME)
    msg = str(ei.value)
    for part in ("MahmoodLab/conchv1_5", "pytorch_model_vision.bin", "MahmoodLab/TITAN", FILES[1],
                 "--encoder-weights", E.WEIGHTS_DIR_ENV, "gated"):
        assert part in msg, part


def test_titans_copy_is_found_in_the_hf_cache(no_weights_anywhere, temp_encoder, monkeypatch):
    """TITAN's ``return_conch()`` reads conch_v1_5_pytorch_model.bin from MahmoodLab/TITAN: found there too."""
    sd = released_state_dict(1)
    repo_dir = no_weights_anywhere / "hf" / "hub" / "models--MahmoodLab--TITAN"
    snap = repo_dir / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(snap.name)
    torch.save(sd, snap / FILES[1])
    enc = load_encoder(temp_encoder(_shrunk_spec(1)))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(_tiles(1)), _reference(sd, enc.preprocess(_tiles(1)), 1),
                                   atol=2e-5, rtol=1e-4)


def test_fast_mode_is_refused(temp_encoder, tmp_path):
    torch.save(released_state_dict(1), tmp_path / FILES[0])
    enc = load_encoder(temp_encoder(_shrunk_spec(1)), weights=tmp_path / FILES[0])
    with pytest.raises(EncoderError, match="without --fast"):
        enc.forward_tokens(enc.preprocess(_tiles(1)))


def test_encoders_command_lists_conch():
    from deepspot.cli import app, spots  # noqa: F401 - spots adds the `encoders` command to app

    res = CliRunner().invoke(app, ["encoders"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    rows = {ln.split("│")[1].strip(): ln for ln in res.output.splitlines() if ln.count("│") > 3}
    row = rows[NAME]
    assert "768" in row and "448" in row and "CC-BY-NC-ND-4.0" in row and "│ yes" in row


# ---------------------------------------------------------------- full size (slow)


@pytest.mark.slow
def test_full_size_random_weights_through_the_loader(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("ViT-L at 448 px (1.2 GB file): run with -m slow")
    sd = released_state_dict(24)
    torch.save(sd, tmp_path / FILES[0])
    enc = load_encoder(NAME, weights=tmp_path / FILES[0])
    tiles = _tiles(1)
    got = enc.encode(tiles)
    assert got.shape == (1, 768) and torch.isfinite(got).all()
    with torch.no_grad():
        want = _reference(sd, enc.preprocess(tiles), 24)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
