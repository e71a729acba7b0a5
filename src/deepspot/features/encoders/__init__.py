"""Frozen image encoders (pathology foundation models and ImageNet CNNs) by name.

Each encoder is one :class:`EncoderSpec` in a registry; :func:`load_encoder`
turns a name into a frozen :class:`Encoder` that maps uint8 RGB tiles to
``(B, dim)`` float32 features. The rooms:

* :mod:`.registry`: :class:`EncoderSpec`, :func:`register_encoder`, :func:`get_spec`, :class:`EncoderError`;
* :mod:`.module`: the :class:`Encoder` module and :func:`load_encoder`;
* :mod:`.weights`: where weight files are found and how they are read (never from the network, never
  running pickled code);
* :mod:`.zoo`: the built-in encoders, each a spec whose builder receives that spec.

A new encoder is one :func:`register_encoder` call (docs/weights.md); a built-in one goes in :mod:`.zoo`.
"""
from deepspot.features.encoders.registry import (_REGISTRY, EncoderError, EncoderSpec, get_spec, list_encoders,
                                                 register_encoder, unregister_encoder)
from deepspot.features.encoders.module import Encoder, load_encoder, resolve_autocast
from deepspot.features.encoders.weights import (WEIGHT_SUFFIXES, WEIGHTS_DIR_ENV, find_weights, missing_weights,
                                                read_state_dict)
from deepspot.features.encoders.zoo import (HALF, ClsMeanPatch, HOPTIMUS0_MEAN, HOPTIMUS0_STD, IMAGENET_MEAN, IMAGENET_STD,
                                            HFClsToken, TVFeatures, _effnet_arch, efficientnet_lite0_state_dict)

__all__ = ["ClsMeanPatch", "Encoder", "EncoderError", "EncoderSpec", "HALF", "HFClsToken", "HOPTIMUS0_MEAN", "HOPTIMUS0_STD",
           "IMAGENET_MEAN", "IMAGENET_STD", "TVFeatures", "WEIGHTS_DIR_ENV", "WEIGHT_SUFFIXES",
           "efficientnet_lite0_state_dict", "find_weights", "get_spec", "list_encoders", "load_encoder",
           "missing_weights", "read_state_dict", "register_encoder", "resolve_autocast", "unregister_encoder"]
