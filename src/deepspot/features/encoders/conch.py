"""CONCH v1.5's vision tower (``conch-v1.5``): a ViT-L/16 trunk at 448 px, the CoCa attentional pooler
(1 query) over all its tokens and a LayerNorm; state-dict keys as the released file names them
(``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``). Registered in :mod:`deepspot.features.encoders.zoo`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepspot.features.encoders.registry import EncoderError, EncoderSpec
from deepspot.features.encoders.weights import _load_into, _strip_prefixes, find_weights, missing_weights, read_state_dict

CONCH_POOL = "attentional pooler (1 query) over all ViT tokens + LayerNorm"

# --- CONCH v1.5 (vision tower: ViT-L/16 trunk + CoCa attentional pooler) -----------------


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH v1.5 uses it for its contrastive image feature.

    ``n_queries`` learned queries (``query``, ``(n_queries, d_model)``) attend over the trunk's tokens with
    ``n_head`` heads of ``d_model // n_head`` dims: LayerNorm on the queries (``ln_q``) and on the tokens
    (``ln_k``), bias-free projections ``to_q`` (d_model -> d_model), ``to_kv`` (context_dim -> 2 x d_model,
    keys then values) and ``to_out`` (d_model -> d_model), softmax(q k^T / sqrt(head dim)) v. Returns
    ``(B, n_queries, d_model)``. The parameter names are the released checkpoint's."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, N, d) each
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, d)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, h, L, d / h)
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # scale 1/sqrt(d / h)
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))


def _conch15_trunk(depth: int = 24) -> nn.Module:
    """CONCH v1.5's trunk: ViT-L/16 (dim 1024, 16 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, a CLS token,
    LayerScale) whose position embedding is stored for a 14x14 grid (224 px) plus the CLS token."""
    import timm

    return timm.create_model("vit_large_patch16_224", img_size=224, depth=depth, init_values=1.0, num_classes=0)


class Conch15(nn.Module):
    """CONCH v1.5's vision tower (TITAN's ``return_conch()``, TRIDENT's ``conch_v15``): 448-px tiles through
    the ViT-L/16 trunk (all 785 tokens after its final LayerNorm, CLS included), the attentional pooler (one
    query, 8 heads, 1024 -> 768) and a LayerNorm (``ln_contrast``); the feature is that 768-d vector (no
    projection, not L2-normalised).

    The position embedding is stored for 14x14 patches and resized to the input's grid at every forward as the
    release's own model code does (DINO style: bicubic, with the scale factor (grid + 0.1) / 14, not a target
    size), so a 448-px tile sees what it sees under TITAN / TRIDENT. State-dict keys: ``trunk.*`` (timm's
    ViT names), ``attn_pool_contrast.*``, ``ln_contrast.*``, as the released ``pytorch_model_vision.bin``
    (MahmoodLab/conchv1_5) and ``conch_v1_5_pytorch_model.bin`` (MahmoodLab/TITAN) name them.

    Not checked against the released weights themselves (they are gated): that the file's position embedding
    is for 14x14 patches follows from the release's code, which builds the trunk at its 224-px default and
    loads the file strictly (TITAN) or resizes it to that grid first (TRIDENT); a file of another grid is
    refused here with a ``size mismatch`` on ``trunk.pos_embed`` rather than resized. The release runs the
    model in fp16 (TRIDENT); deepspot runs it in fp32 unless autocast is asked for."""

    def __init__(self, depth: int = 24):
        super().__init__()
        self.trunk = _conch15_trunk(depth)
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)
        self.num_features = 768

    def _pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        pos = self.trunk.pos_embed
        n = pos.shape[1] - 1
        if n == rows * cols and rows == cols:
            return pos
        side = int(round(n ** 0.5))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        if grid.shape[-2:] != (rows, cols):
            raise EncoderError(f"CONCH v1.5: position embedding resized to {tuple(grid.shape[-2:])}, expected "
                               f"{(rows, cols)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B,3,S,S) -> every token of the trunk (B, 1 + (S/16)^2, 1024), final norm applied."""
        t = self.trunk
        p = t.patch_embed.proj(x)  # (B, 1024, rows, cols)
        rows, cols = p.shape[-2:]
        p = t.patch_embed.norm(p.flatten(2).transpose(1, 2))
        z = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), p], dim=1) + self._pos_embed(rows, cols)
        return t.norm(t.blocks(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.tokens(x))[:, 0])

    def cls_and_tokens(self, x: torch.Tensor):
        raise EncoderError("CONCH v1.5's features are the attentional pooler's 768-d output, its patch tokens "
                           "1024-d trunk tokens, so a patch token is not a feature of the same kind; run without "
                           "--fast")


CONCH15_TITAN = ("MahmoodLab/TITAN", "conch_v1_5_pytorch_model.bin")


def _build_conch15(spec: EncoderSpec, weights: Path | None, depth: int = 24) -> nn.Module:
    """CONCH v1.5 from its released file (``trunk.`` / ``attn_pool_contrast.`` / ``ln_contrast.`` keys, loaded
    strictly); also found as TITAN's copy in the local Hugging Face cache."""
    from deepspot.features.encoders.weights import _hf_cached

    path = find_weights(spec, weights) or (None if weights is not None else _hf_cached(*CONCH15_TITAN))
    if path is None:
        raise missing_weights(spec)
    sd = _strip_prefixes(read_state_dict(path))
    return _load_into(partial(Conch15, depth), sd, path, spec.name)
