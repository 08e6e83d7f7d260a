"""CNN feature encoders for the token-based backbones, chosen with ``--encoder``.

An encoder maps normalised crops (B, 3, S, S) to a feature grid (B, C, h, w) and exposes
``out_channels`` (C) and ``stride`` (S / h, rounded up at each halving).

* ``small`` (default, for CPUs): a compact ResNet-style CNN of basic blocks. Its output stride
  adapts to the input so that the grid has at most :data:`MAX_GRID` cells a side: stride 8 at
  64 px (8×8 grid), 16 at 128 px (8×8), 32 at 224 px (7×7). 256 channels out.
* ``resnet50``: ResNet-50 (v1.5, stride on the 3×3 convolution) whose ``state_dict`` keys
  match torchvision's ``resnet50`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), without the
  classifier, so ImageNet weights load from a local file; 2048 channels at stride 32.

Normalisation. ``norm="batch"`` (default) uses BatchNorm: cheapest on CPUs and required by
torchvision's weights. Under federated averaging its running statistics are averaged like the
weights, which is fine for roughly IID clients; under strong non-IID data or per-sample
differential privacy (which forbids statistics mixing samples of a batch) choose
``norm="group"`` (GroupNorm, no running statistics, batch-size independent) for ``small``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

__all__ = [
    "ENCODERS",
    "NORMS",
    "FeatureEncoder",
    "ResNet50Encoder",
    "SmallEncoder",
    "build_encoder",
    "load_encoder_weights",
]

#: The small encoder adds stride-2 stages until the grid side is at most this many cells.
MAX_GRID = 8
#: ... but never goes beyond this output stride.
MAX_STRIDE = 32
#: Channels of the small encoder: stem, then (width, blocks) per stride-2 stage up to stride 8.
SMALL_STEM_WIDTH = 32
SMALL_STAGES = ((64, 1), (128, 2))
#: Width of the small encoder's extra downsampling stages and of its output.
SMALL_OUT_WIDTH = 256
#: GroupNorm groups (every width used here is divisible by it).
GROUP_NORM_GROUPS = 8

#: torchvision's ResNet-50: bottleneck widths and block counts of layer1..layer4.
RESNET50_WIDTHS = (64, 128, 256, 512)
RESNET50_BLOCKS = (3, 4, 6, 3)
BOTTLENECK_EXPANSION = 4
RESNET50_STEM_WIDTH = 64

#: Keys of a classification checkpoint that an encoder does not have.
CLASSIFIER_PREFIX = "fc."

NORMS = ("batch", "group")


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    raise ValueError(f"unknown encoder norm {norm!r}; choose one of {list(NORMS)}")


def _halvings(size: int, times: int) -> int:
    """Side of a grid after ``times`` stride-2 layers with 'same' padding (ceil at each step)."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


class FeatureEncoder(nn.Module):
    """Base class: ``forward(images (B, 3, S, S))`` → features (B, out_channels, h, w)."""

    out_channels: int
    stride: int
    #: set by :meth:`freeze`: weights fixed and normalisation statistics used as they are
    frozen: bool = False

    def grid_size(self, input_size: int) -> int:
        """Side h = w of the feature grid for a square input of ``input_size`` pixels."""
        return _halvings(input_size, int(math.log2(self.stride)))

    def freeze(self) -> FeatureEncoder:
        """Use the encoder as a fixed feature extractor (a pretrained CNN): no gradients, so the
        optimizer leaves it out, and eval mode for good, so BatchNorm keeps its statistics."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FeatureEncoder:
        return super().train(mode and not self.frozen)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (1×1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallEncoder(FeatureEncoder):
    """Compact ResNet-style CNN: stride 8 at 64 px (8×8×256), up to stride 32 for large inputs."""

    def __init__(self, input_size: int, norm: str = "batch") -> None:
        super().__init__()
        make_norm = _norm_factory(norm)
        layers: list[nn.Module] = [
            nn.Conv2d(3, SMALL_STEM_WIDTH, 3, 2, 1, bias=False),
            make_norm(SMALL_STEM_WIDTH),
            nn.ReLU(inplace=True),
        ]
        width, stride = SMALL_STEM_WIDTH, 2
        for stage_width, blocks in SMALL_STAGES:
            for i in range(blocks):
                layers.append(BasicBlock(width, stage_width, 2 if i == 0 else 1, make_norm))
                width = stage_width
            stride *= 2
        while stride < MAX_STRIDE and math.ceil(input_size / stride) > MAX_GRID:
            layers.append(BasicBlock(width, SMALL_OUT_WIDTH, 2, make_norm))
            width, stride = SMALL_OUT_WIDTH, stride * 2
        layers.append(BasicBlock(width, SMALL_OUT_WIDTH, 1, make_norm))
        self.layers = nn.Sequential(*layers)
        self.out_channels = SMALL_OUT_WIDTH
        self.stride = stride

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (1×1 → 3×3 with the stride → 1×1 ×4), same attribute names."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50Encoder(FeatureEncoder):
    """ResNet-50 trunk in torchvision's key layout (no ``avgpool``/``fc``): 2048 channels, stride 32."""

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        if norm != "batch":
            raise ValueError(
                f"the resnet50 encoder uses BatchNorm (torchvision's layout), got norm={norm!r}; "
                "use --encoder small for GroupNorm"
            )
        self.conv1 = nn.Conv2d(3, RESNET50_STEM_WIDTH, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(RESNET50_STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = RESNET50_STEM_WIDTH
        for index, (width, blocks) in enumerate(zip(RESNET50_WIDTHS, RESNET50_BLOCKS)):
            stride = 1 if index == 0 else 2
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(channels, width, stride if i == 0 else 1))
                channels = width * BOTTLENECK_EXPANSION
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.out_channels = channels
        self.stride = 32

    def forward(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


ENCODERS: Mapping[str, Callable[[int, str], FeatureEncoder]] = {
    "small": lambda input_size, norm: SmallEncoder(input_size, norm),
    "resnet50": lambda input_size, norm: ResNet50Encoder(norm),
}


def build_encoder(name: str, input_size: int, norm: str = "batch", weights: str | Path | None = None) -> FeatureEncoder:
    """Build the encoder called ``name`` for ``input_size``-pixel crops, optionally loading weights."""
    key = name.lower()
    if key not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; available encoders: {sorted(ENCODERS)}")
    encoder = ENCODERS[key](input_size, norm)
    if weights is not None:
        load_encoder_weights(encoder, weights)
    return encoder


_WEIGHTS_ADVICE = "Encoder weights are a state dict of tensors (torchvision's files are); use such a file."


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local state dict (e.g. torchvision's ``resnet50`` ImageNet file) into ``encoder``.

    Classifier keys (``fc.*``) are ignored; any other missing or unexpected key, or a shape
    mismatch, raises :class:`ValueError` naming the file and the keys.
    """
    from pchmr.core.kit.safe_pickle import UnreadableFileError, UnsafeFileError, load_torch_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist")
    try:
        state = load_torch_file(path, what="encoder weights file", advice=_WEIGHTS_ADVICE)
    except (UnsafeFileError, UnreadableFileError):
        raise
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot read encoder weights from {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"encoder weights file {path} holds a {type(state).__name__}, expected a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"encoder weights in {path} do not match {type(encoder).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}), "
            f"wrong shape {wrong[:5]} ({len(wrong)}); expected torchvision's key layout"
        )
    encoder.load_state_dict(state, strict=True)
