"""Test helpers shared by the CLI-level test modules: a tiny registered encoder and an in-process CLI run."""
import torch

from deepspot.features.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder


def tiny_vit():
    """A 1-block ViT on 32 px crops with fixed random weights (dim 32)."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                 depth=1, num_heads=2, num_classes=0, dynamic_img_size=True)


def register_tiny_vit(name: str) -> str:
    """Register :func:`tiny_vit` as encoder ``name`` (idempotent); returns the name."""
    register_encoder(EncoderSpec(name, 32, 32, IMAGENET_MEAN, IMAGENET_STD, lambda _path: tiny_vit(),
                                 "fixed random weights (tests)", False, arch=tiny_vit), overwrite=True)
    return name


def run_cli(capsys, *args):
    """``deepspot ARGS`` in this process -> (exit code, stdout, stderr)."""
    from deepspot.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err
