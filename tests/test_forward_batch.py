"""Standard-mode crops go through the encoder in forward passes of at most FORWARD_BATCH[device type]
crops (small on a CPU, where that keeps a convnet's activations in cache), with the same features."""
from __future__ import annotations

import torch
from torch import nn

from deepspot.features import extract
from deepspot.features.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, load_encoder, register_encoder

SEEN: list[int] = []


class Spy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))

    def forward(self, x):
        SEEN.append(x.shape[0])
        return self.net(x)


def test_forward_batch_by_device_type():
    assert extract.forward_batch("cpu") == extract.FORWARD_BATCH["cpu"]
    assert extract.forward_batch(torch.device("cuda", 1)) == extract.FORWARD_BATCH["cuda"]
    assert extract.forward_batch("meta") == extract.FORWARD_BATCH["cuda"]  # other kinds: the accelerator value


def test_standard_mode_forwards_are_capped_and_features_unchanged():
    register_encoder(EncoderSpec("test-spy", 6, 32, IMAGENET_MEAN, IMAGENET_STD, lambda _p: Spy(), "random (test)",
                                 False, arch=Spy), overwrite=True)
    enc = load_encoder("test-spy", random_init=True)
    crops = torch.randint(0, 256, (5, 10, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    SEEN.clear()
    spot, sub = extract.encode_batch(enc, crops, n_sub=3)
    cap = extract.FORWARD_BATCH["cpu"]
    assert sum(SEEN) == 50 and max(SEEN) == min(cap, 50) and len(SEEN) == -(-50 // cap)
    whole = enc.encode(crops.reshape(50, 32, 32, 3)).reshape(5, 10, 6).numpy()  # one forward of all 50
    assert spot.shape == (5, 6) and sub.shape == (5, 9, 6)
    assert abs(spot - whole[:, 0]).max() < 1e-5 and abs(sub - whole[:, 1:]).max() < 1e-5
