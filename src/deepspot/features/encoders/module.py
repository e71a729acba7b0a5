"""The encoder module: a frozen :class:`Encoder` (uint8 RGB tiles -> ``(B, dim)`` float32 features) and
:func:`load_encoder`, which builds one from its registry entry."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepspot.features.encoders.registry import EncoderError, EncoderSpec, get_spec

log = logging.getLogger(__name__)


def _cpu_has_fast_bf16() -> bool:
    """True where the CPU has AMX bf16 tiles (bf16 matmuls run faster than fp32 there)."""
    cpu = getattr(torch._C, "_cpu", None)
    try:
        caps = cpu._get_cpu_capability() if hasattr(cpu, "_get_cpu_capability") else {}
        return bool(caps.get("amx_bf16", False))
    except Exception:  # pragma: no cover - private API changed
        return False


def resolve_autocast(dt, device) -> torch.dtype | None:
    """``dt`` as a torch dtype (None = full fp32). ``"auto"``: bf16 on CUDA (fp16 where bf16 is not
    supported), bf16 on CPUs with AMX, otherwise fp32."""
    if isinstance(dt, str) and dt.lower() == "auto":
        dev = torch.device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if dev.type == "cpu" and _cpu_has_fast_bf16() else None
    return _as_dtype(dt)


def _as_dtype(dt) -> torch.dtype | None:
    if dt is None or isinstance(dt, torch.dtype):
        return dt
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": None, "float32": None, "none": None}
    key = str(dt).lower().replace("torch.", "")
    if key not in names:
        raise EncoderError(f"unknown autocast dtype '{dt}'; use bf16, fp16 or fp32")
    return names[key]


class Encoder(nn.Module):
    """A frozen feature extractor: uint8 RGB tiles -> ``(B, dim)`` float32 features."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, random_init: bool = False):
        super().__init__()
        self.spec = spec
        self.name, self.dim, self.input_size = spec.name, spec.dim, spec.input_size
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        self.random_init = random_init
        self.model = model
        self.register_buffer("_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.channels_last = False
        self._compiled: Callable | None = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: D401 - frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def preprocess(self, tiles) -> torch.Tensor:
        """uint8 tiles (B,H,W,3) (or (H,W,3), or (B,3,H,W)), numpy or torch -> (B,3,S,S) float32,
        resized (bilinear, antialiased) to ``input_size`` and normalised with ``mean``/``std``."""
        x = tiles
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x)
            x = torch.from_numpy(x if x.flags.writeable else x.copy())
        if not isinstance(x, torch.Tensor):
            raise EncoderError(f"tiles must be a numpy array or torch tensor, got {type(tiles).__name__}")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise EncoderError(f"tiles must have shape (B,H,W,3), got {tuple(x.shape)}")
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        elif x.shape[1] != 3:
            raise EncoderError(f"tiles must be RGB (B,H,W,3), got {tuple(x.shape)}")
        x = x.to(self.device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._compiled or self.model
        out = fn(x)
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise EncoderError(f"encoder '{self.name}' gave features of shape {tuple(out.shape)}, expected (B, {self.dim})")
        return out.float()

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (B,3,S,S) -> (the usual features (B,d), patch tokens (B,h,w,d)) from one pass.

        timm ViTs: head output and the patch tokens (prefix/register tokens dropped); timm CNNs: pooled
        features and the final feature map; Hugging Face ViTs: CLS token and patch tokens.
        """
        m = self.model
        if hasattr(m, "cls_and_tokens"):  # a wrapper that knows its tokens (zoo.HFClsToken)
            cls, tok, (gh, gw) = m.cls_and_tokens(x)
        elif hasattr(m, "forward_features") and hasattr(m, "forward_head"):
            f = m.forward_features(x)
            cls = m.forward_head(f)
            if f.ndim == 4:  # CNN feature map (B,d,h,w)
                tok, (gh, gw) = f.permute(0, 2, 3, 1), f.shape[-2:]
            else:  # ViT tokens (B, prefix + h*w, d)
                pe = m.patch_embed
                gh, gw = (pe.dynamic_feat_size(x.shape[-2:]) if getattr(pe, "dynamic_img_size", False)
                          else pe.grid_size)
                tok = f[:, getattr(m, "num_prefix_tokens", 1):]
        else:
            raise EncoderError(f"encoder '{self.name}' does not expose patch tokens (fast mode needs a timm ViT/CNN "
                               f"or a Hugging Face ViT)")
        if cls.shape != (x.shape[0], self.dim) or tok.numel() != x.shape[0] * gh * gw * self.dim:
            raise EncoderError(f"encoder '{self.name}' gave tokens of shape {tuple(tok.shape)}, expected {gh}x{gw} patches")
        return cls.float(), tok.reshape(x.shape[0], gh, gw, self.dim).float()

    @torch.no_grad()
    def encode(self, tiles, device=None, autocast_dtype=None, batch_size: int | None = None) -> torch.Tensor:
        """Preprocess + forward; returns float32 CPU ``(B, dim)``.

        ``device``: move the encoder there first (default: where it is). ``autocast_dtype``:
        ``torch.bfloat16``/``torch.float16`` (or "bf16"/"fp16"/"auto") to run under autocast.
        ``batch_size``: split the tiles into chunks of this size.
        """
        if device is not None and torch.device(device) != self.device:
            self.to(device)
        dtype = resolve_autocast(autocast_dtype, self.device)
        n = len(tiles)
        if n == 0:
            return torch.zeros(0, self.dim)
        step = batch_size or n
        outs = []
        for i in range(0, n, step):
            x = self.preprocess(tiles[i:i + step])
            if dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    y = self.forward(x)
            else:
                y = self.forward(x)
            outs.append(y.float().cpu())
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def optimize(self, channels_last: bool = False, compile: bool = False) -> "Encoder":
        """Opt-in speed-ups: channels-last memory format (CNNs) and ``torch.compile``."""
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            self._compiled = torch.compile(self.model, dynamic=False)
        return self


def load_encoder(name: str, weights: str | Path | None = None, random_init: bool = False,
                 device="cpu", channels_last: bool = False, compile: bool = False) -> Encoder:
    """Build encoder ``name`` with its weights (or random weights, ``random_init=True``)."""
    spec = get_spec(name)
    if random_init:
        if spec.arch is None:
            raise EncoderError(f"encoder '{spec.name}' cannot be built without weights")
        log.warning("encoder '%s' built with RANDOM weights: features are meaningless (tests/benchmarks only)", spec.name)
        model = spec.arch()
    else:
        if weights is not None and not Path(weights).expanduser().exists():
            raise EncoderError(f"encoder '{spec.name}': weights path {weights} does not exist")
        model = spec.builder(Path(weights).expanduser() if weights is not None else None)
    nf = getattr(model, "num_features", None)
    if isinstance(nf, int) and nf != spec.dim:
        raise EncoderError(f"encoder '{spec.name}': the weights give {nf}-d features, expected {spec.dim}-d "
                           f"(wrong model or config?)")
    enc = Encoder(spec, model.float(), random_init=random_init).to(device)
    return enc.optimize(channels_last=channels_last, compile=compile)

