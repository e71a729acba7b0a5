"""Test helpers shared by the CLI-level test modules: a tiny registered encoder and an in-process CLI run."""
from contextlib import contextmanager

import pytest
import torch

from deepspot.features.encoders import (IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder,
                                        unregister_encoder)
from deepspot.features.encoders.registry import _REGISTRY


def tiny_vit():
    """A 1-block ViT on 32 px crops with fixed random weights (dim 32)."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                 depth=1, num_heads=2, num_classes=0, dynamic_img_size=True)


def tiny_vit_spec(name: str) -> EncoderSpec:
    return EncoderSpec(name, 32, 32, IMAGENET_MEAN, IMAGENET_STD, lambda _path: tiny_vit(),
                       "fixed random weights (tests)", False, arch=tiny_vit)


@contextmanager
def encoder_registered(*specs: EncoderSpec):
    """Register test encoders for the ``with`` block; on leaving it each is unregistered (an encoder it
    replaced is put back), so no test leaves an encoder in the global registry."""
    replaced = [(s.name, _REGISTRY.get(s.name)) for s in specs]
    for s in specs:
        register_encoder(s, overwrite=True)
    try:
        yield [s.name for s in specs]
    finally:
        for name, old in reversed(replaced):
            unregister_encoder(name)
            if old is not None:
                register_encoder(old)


def register_tiny_vit(name: str) -> str:
    """Register :func:`tiny_vit` as encoder ``name`` (idempotent); returns the name. Call it inside a test or
    fixture that unregisters it, never at import (tests/conftest.py fails a module that does);
    :func:`tiny_vit_encoder` does both."""
    register_encoder(tiny_vit_spec(name), overwrite=True)
    return name


def tiny_vit_encoder(name: str):
    """A module-scoped autouse fixture: :func:`tiny_vit` is encoder ``name`` while the module's tests run.
    Use as ``_tiny = tiny_vit_encoder("my-name")`` at module level."""

    @pytest.fixture(scope="module", autouse=True)
    def _tiny_vit_registered():
        with encoder_registered(tiny_vit_spec(name)):
            yield name

    return _tiny_vit_registered


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


def edited_checkpoint(ck, tmp, edit):
    """A copy of checkpoint folder ``ck`` at ``tmp/edited`` whose config.json went through ``edit(cfg)``."""
    import json
    import shutil
    from pathlib import Path

    d = Path(tmp) / "edited"
    shutil.copytree(ck, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d
