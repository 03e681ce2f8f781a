"""The networks as data: Simonyan & Zisserman Table 1 and Chatfield et al. Table 1.

Each architecture is a tuple of blocks; a block is a tuple of small typed layer
tokens. One builder (`pipeline.models.build_model`) reads these tables; nothing
else in the project knows a layer count.

Names follow Caffe's deploy files so that "initialise from A" is a copy by name:
- VGG A..E: convolutions `conv{block}_{i}`, `lrn1` (A-LRN only), `pool{block}`;
- VGG-F/M/S: one convolution per block, `conv{block}`, `lrn{block}`, `pool{block}`;
- heads: `fc6`, `fc7`, `fc8`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Conv:
    """A convolution followed by ReLU (and batch norm in the *_bn variants)."""

    out: int
    k: int = 3
    stride: int = 1
    pad: int | None = None  # None: "same" padding for stride 1, k // 2

    @property
    def padding(self) -> int:
        return self.k // 2 if self.pad is None else self.pad


@dataclass(frozen=True)
class Pool:
    """Max pooling. Caffe rounds the output size up; `ceil=True` reproduces that."""

    k: int = 2
    stride: int = 2
    ceil: bool = False


@dataclass(frozen=True)
class LRN:
    """AlexNet's local response normalisation across channels, in Krizhevsky et al.'s
    own terms (Section 3.3): b_i = a_i / (k + alpha * sum of a_j^2 over the `size`
    channels centred on i)^beta, with k 2, alpha 1e-4, beta 0.75, size 5. `alpha` here
    multiplies the plain sum; Caffe and torch.nn.LocalResponseNorm multiply the *mean*
    over the window (alpha / size), so the builder passes them alpha * size (5e-4, as the
    released VGG_CNN_F/M/S models write it)."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0


Layer = Conv | Pool | LRN


@dataclass(frozen=True)
class Arch:
    name: str
    blocks: tuple[tuple[Layer, ...], ...]
    numbered_convs: bool = True  # conv1_1 (VGG A-E) or conv1 (VGG-F/M/S)
    hidden: int = 4096  # fc6 and fc7 width
    source: str = ""

    def layer_names(self) -> list[tuple[str, Layer]]:
        """(name, token) in forward order, with Caffe-style names."""
        named: list[tuple[str, Layer]] = []
        for b, block in enumerate(self.blocks, start=1):
            i = 0
            for tok in block:
                if isinstance(tok, Conv):
                    i += 1
                    named.append((f"conv{b}_{i}" if self.numbered_convs else f"conv{b}", tok))
                elif isinstance(tok, LRN):
                    named.append((f"lrn{b}", tok))
                else:
                    named.append((f"pool{b}", tok))
        return named

    @property
    def weight_layers(self) -> int:
        return sum(isinstance(t, Conv) for _, t in self.layer_names()) + 3


def _vgg_block(width: int, convs: int, *, one_by_one_last: bool = False, lrn: bool = False):
    layers: list[Layer] = [Conv(width) for _ in range(convs)]
    if one_by_one_last:
        layers.append(Conv(width, k=1))  # config C: conv1 layers, Table 1
    if lrn:
        layers.append(LRN())
    layers.append(Pool())
    return tuple(layers)


def _vgg(name: str, convs: tuple[int, ...], *, c_style: bool = False, lrn: bool = False) -> Arch:
    widths = (64, 128, 256, 512, 512)
    blocks = tuple(
        _vgg_block(w, n, one_by_one_last=c_style and b >= 2, lrn=lrn and b == 0)
        for b, (w, n) in enumerate(zip(widths, convs))
    )
    return Arch(name, blocks, source="Simonyan & Zisserman 2015, Table 1")


# Simonyan & Zisserman, Table 1: conv layers per block.
_CHATFIELD = "Chatfield et al. 2014, Table 1"
ARCHS: dict[str, Arch] = {
    "A": _vgg("A", (1, 1, 2, 2, 2)),
    "A-LRN": _vgg("A-LRN", (1, 1, 2, 2, 2), lrn=True),
    "B": _vgg("B", (2, 2, 2, 2, 2)),
    # C: two 3x3 convs then one 1x1 conv in blocks 3-5.
    "C": _vgg("C", (2, 2, 2, 2, 2), c_style=True),
    "D": _vgg("D", (2, 2, 3, 3, 3)),
    "E": _vgg("E", (2, 2, 4, 4, 4)),
    # Chatfield et al. give each pool's factor only; the released VGG_CNN_F/M/S Caffe
    # models give the kernels: "pool x2" is 3x3 stride 2 (except S's pool2: 2x2 stride 2),
    # "pool x3" is 3x3 stride 3; Caffe rounds up.
    "F": Arch(
        "F",
        (
            (Conv(64, 11, 4, 0), LRN(), Pool(3, 2, True)),
            (Conv(256, 5, 1, 2), LRN(), Pool(3, 2, True)),
            (Conv(256, 3, 1, 1),),
            (Conv(256, 3, 1, 1),),
            (Conv(256, 3, 1, 1), Pool(3, 2, True)),
        ),
        numbered_convs=False,
        source=_CHATFIELD,
    ),
    "M": Arch(
        "M",
        (
            (Conv(96, 7, 2, 0), LRN(), Pool(3, 2, True)),
            (Conv(256, 5, 2, 1), LRN(), Pool(3, 2, True)),
            (Conv(512, 3, 1, 1),),
            (Conv(512, 3, 1, 1),),
            (Conv(512, 3, 1, 1), Pool(3, 2, True)),
        ),
        numbered_convs=False,
        source=_CHATFIELD,
    ),
    "S": Arch(
        "S",
        (
            (Conv(96, 7, 2, 0), LRN(), Pool(3, 3, True)),
            (Conv(256, 5, 1, 1), Pool(2, 2, True)),  # VGG_CNN_S: pool2 2x2 stride 2 (35 -> 18)
            (Conv(512, 3, 1, 1),),
            (Conv(512, 3, 1, 1),),
            (Conv(512, 3, 1, 1), Pool(3, 3, True)),
        ),
        numbered_convs=False,
        source=_CHATFIELD,
    ),
}

ALIASES = {
    "vgg11": "A",
    "vgg11-lrn": "A-LRN",
    "vgg13": "B",
    "vgg16": "D",
    "vgg19": "E",
    "vgg-f": "F",
    "vgg-m": "M",
    "vgg-s": "S",
}

# The paper initialises deeper nets from net A by these names (Section 3.1).
PAPER_INIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


def get_arch(name: str) -> Arch:
    key = ALIASES.get(name.lower(), name.upper() if name.upper() in ARCHS else name)
    if key not in ARCHS:
        known = ", ".join(list(ARCHS) + list(ALIASES))
        raise KeyError(f"unknown architecture {name!r}; known: {known}")
    return ARCHS[key]


def out_size(size: int, k: int, stride: int, pad: int, ceil: bool = False) -> int:
    """Output side of a conv or pool, with Caffe's (ceil) or PyTorch's (floor) rounding."""
    span = size + 2 * pad - k
    if span < 0:
        raise ValueError(f"input side {size} is smaller than the kernel {k}")
    n = (math.ceil(span / stride) if ceil else span // stride) + 1
    # PyTorch (like Caffe) drops a last window that would start in the padding.
    if ceil and (n - 1) * stride >= size + pad:
        n -= 1
    return n


def feature_side(arch: Arch, input_size: int) -> int:
    """Side of the last feature map for a square input: 7 for VGG at 224, 6 for F/M/S."""
    side = input_size
    for _, tok in arch.layer_names():
        if isinstance(tok, Conv):
            side = out_size(side, tok.k, tok.stride, tok.padding)
        elif isinstance(tok, Pool):
            side = out_size(side, tok.k, tok.stride, 0, tok.ceil)
        if side < 1:
            raise ValueError(f"{arch.name}: input {input_size} is too small")
    return side


def unseen_input(arch: Arch, input_size: int) -> int:
    """Input pixels along a side that no unit of the last feature map sees: each
    floor-rounded conv or pool whose windows do not tile its input drops the cells past
    the last window (padding first), and a dropped cell is `stride so far` pixels.
    VGG A-E at 56: the last pool floors 1.75 cells to 1 and 24 of 56 pixels go unseen."""
    side, jump, unseen = input_size, 1, 0
    for _, tok in arch.layer_names():
        if isinstance(tok, LRN):
            continue
        k, stride, pad = (tok.k, tok.stride, tok.padding) if isinstance(tok, Conv) else (tok.k, tok.stride, 0)
        out = out_size(side, k, stride, pad, getattr(tok, "ceil", False))
        if not getattr(tok, "ceil", False):
            left_over = side + 2 * pad - k - (out - 1) * stride
            unseen += max(0, left_over - pad) * jump
        side, jump = out, jump * stride
    return unseen


def crop_tolerance(arch: Arch) -> int:
    """Unseen pixels a crop may leave: none, except the remainder of a strided first
    convolution (AlexNet-style VGG-F/M/S at 224 ignore one border pixel of conv1, as in
    Chatfield et al.'s own nets)."""
    first = next(tok for _, tok in arch.layer_names() if isinstance(tok, Conv))
    return first.stride - 1


def crop_ok(arch: Arch, crop: int) -> bool:
    try:
        return unseen_input(arch, crop) <= crop_tolerance(arch)
    except ValueError:  # smaller than a kernel
        return False


def nearest_crops(arch: Arch, crop: int, n: int = 2) -> list[int]:
    """The `n` valid crop sizes closest to `crop` (ties: the smaller first)."""
    found = [c for c in range(max(1, crop - 256), crop + 257) if crop_ok(arch, c)]
    return sorted(sorted(found, key=lambda c: (abs(c - crop), c))[:n])
