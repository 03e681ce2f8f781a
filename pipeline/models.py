"""One builder for every net in `pipeline.archs`, plus what the paper does with them:
initialisation schemes, initialisation from another net by layer name, the dense
(fully convolutional) evaluation form, and torchvision weight import."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.archs import LRN, PAPER_INIT_LAYERS, Arch, Conv, Pool, feature_side, get_arch, out_size


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


class VGG(nn.Module):
    """`features` (conv1_1 .. pool5) and `classifier` (fc6 .. fc8), named as in Caffe.

    `forward` takes NCHW images of side `input_size` and returns class scores."""

    def __init__(
        self,
        arch: Arch,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        batch_norm: bool = False,
        input_size: int = 224,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.arch, self.num_classes, self.input_size = arch, num_classes, input_size
        self.width_mult, self.batch_norm = width_mult, batch_norm
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = 3
        for name, tok in arch.layer_names():
            suffix = name[len("conv") :] if name.startswith("conv") else ""
            if isinstance(tok, Conv):
                out = _scaled(tok.out, width_mult)
                layers[name] = nn.Conv2d(channels, out, tok.k, tok.stride, tok.padding)
                if batch_norm:
                    layers[f"bn{suffix}"] = nn.BatchNorm2d(out)
                layers[f"relu{suffix}"] = nn.ReLU(inplace=True)
                channels = out
            elif isinstance(tok, LRN):
                # torch (like Caffe) divides alpha by the window size; Krizhevsky's formula does not.
                layers[name] = nn.LocalResponseNorm(tok.size, tok.alpha * tok.size, tok.beta, tok.k)
            elif isinstance(tok, Pool):
                layers[name] = nn.MaxPool2d(tok.k, tok.stride, ceil_mode=tok.ceil)
        self.features = nn.Sequential(layers)
        self.feature_side = feature_side(arch, input_size)
        self.feature_channels = channels
        hidden = _scaled(arch.hidden, width_mult)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(channels * self.feature_side**2, hidden),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(hidden, hidden),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(dropout),
                fc8=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-1] != self.feature_side or x.shape[-2] != self.feature_side:
            raise ValueError(
                f"{self.arch.name} was built for {self.input_size}x{self.input_size} inputs "
                f"(a {self.feature_side}x{self.feature_side} feature map) but got a "
                f"{tuple(x.shape[-2:])} map; use dense_form() for other sizes"
            )
        return self.classifier(torch.flatten(x, 1))

    def weight_layers(self) -> dict[str, nn.Module]:
        """Conv and FC layers by Caffe name."""
        named = {n: m for n, m in self.features.named_children() if isinstance(m, nn.Conv2d)}
        named.update({n: m for n, m in self.classifier.named_children() if isinstance(m, nn.Linear)})
        return named


def build_model(
    name: str,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    batch_norm: bool = False,
    input_size: int = 224,
    dropout: float = 0.5,
    init: str = "paper",
    init_std: float = 0.01,
) -> VGG:
    """Build a net from `pipeline.archs` by name or alias (vgg16 -> D)."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    model = VGG(get_arch(name), num_classes, width_mult, batch_norm, input_size, dropout)
    initialise(model, init, init_std)
    return model


def initialise(model: nn.Module, scheme: str, std: float = 0.01) -> None:
    """Initialise every conv and linear layer; biases to zero, BN to identity.

    - "paper": N(0, std^2). Section 3.1 writes "10^-2 variance"; Caffe's released
      VGG solvers used std 0.01, which is the default here (`init_std`).
    - "glorot": Glorot & Bengio uniform, which the paper notes also works.
    - "kaiming": He et al. normal, fan-out, for ReLU.
    """
    schemes = {
        "paper": lambda w: nn.init.normal_(w, 0.0, std),
        "glorot": nn.init.xavier_uniform_,
        "xavier": nn.init.xavier_uniform_,
        "kaiming": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    }
    if scheme not in schemes:
        raise ValueError(f"unknown init scheme {scheme!r}; known: {', '.join(schemes)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            schemes[scheme](m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- init_from


@dataclass(frozen=True)
class Transfer:
    copied: tuple[str, ...]  # layer names whose tensors were copied
    left: tuple[str, ...]  # weight layers of the target left as initialised


def _layer_of(key: str) -> str:
    """`features.conv1_1.weight` -> `conv1_1`."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def load_state(source: nn.Module | Mapping[str, torch.Tensor] | str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a module, a state dict, or a checkpoint file (ours: {"model": ...})."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, (str, Path)):
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        state = dict(source)
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    return plain_names(state)


_WRAPPERS = ("module.", "_orig_mod.")  # DDP's and torch.compile's


def plain_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under the net's own names: the prefixes DDP and torch.compile add
    stripped in whatever order and number they wrap (compile(DDP(net)) gives
    `_orig_mod.module.conv...`, DDP(compile(net)) `module._orig_mod.conv...`)."""
    def plain(key: str) -> str:
        while key.startswith(_WRAPPERS):
            key = key.split(".", 1)[1]
        return key

    return {plain(k): v for k, v in state.items()}


def init_from(
    target: nn.Module,
    source: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    layers: tuple[str, ...] | list[str] = PAPER_INIT_LAYERS,
) -> Transfer:
    """Copy the named layers' tensors from `source` into `target` (paper Section 3.1:
    deeper nets take conv1_1, conv2_1, conv3_1, conv3_2 and fc6-fc8 from net A).

    Every named layer must exist in both nets with the same shapes; otherwise a
    ValueError names the layer and nothing is copied."""
    src = load_state(source)
    dst = target.state_dict()
    by_layer: dict[str, list[str]] = {}
    for key in dst:
        by_layer.setdefault(_layer_of(key), []).append(key)
    src_by_layer: dict[str, dict[str, str]] = {}
    for key in src:
        src_by_layer.setdefault(_layer_of(key), {})[key.rsplit(".", 1)[-1]] = key
    updates: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer not in by_layer:
            raise ValueError(f"init_from: layer {layer!r} is not in the target net")
        if layer not in src_by_layer:
            raise ValueError(f"init_from: layer {layer!r} is not in the source net")
        for key in by_layer[layer]:
            leaf = key.rsplit(".", 1)[-1]
            if leaf not in src_by_layer[layer]:
                raise ValueError(f"init_from: source layer {layer!r} has no {leaf!r} tensor")
            tensor = src[src_by_layer[layer][leaf]]
            if tuple(tensor.shape) != tuple(dst[key].shape):
                raise ValueError(
                    f"init_from: layer {layer!r} {leaf} has shape {tuple(tensor.shape)} in the "
                    f"source but {tuple(dst[key].shape)} in the target"
                )
            updates[key] = tensor
    target.load_state_dict(updates, strict=False)
    weight_layers = [
        _layer_of(k) for k in dst if k.endswith(".weight") and dst[k].dim() in (2, 4)
    ]
    copied = tuple(dict.fromkeys(layers))
    left = tuple(n for n in dict.fromkeys(weight_layers) if n not in copied)
    return Transfer(copied, left)


# ---------------------------------------------------------------- dense evaluation


class DenseVGG(nn.Module):
    """Section 3.2: fc6 becomes a (feature_side x feature_side) convolution and fc7,
    fc8 become 1x1 convolutions, so the net runs on any image at least as large as
    the training crop and returns a class score map (N, classes, h, w)."""

    def __init__(self, model: VGG):
        super().__init__()
        fc6, fc7, fc8 = (model.classifier.get_submodule(n) for n in ("fc6", "fc7", "fc8"))
        side, channels = model.feature_side, model.feature_channels
        self.features = model.features
        # On the fc layers' device and dtype: the net may already sit on a GPU (or be float64).
        like = dict(device=fc6.weight.device, dtype=fc6.weight.dtype)
        conv6 = nn.Conv2d(channels, fc6.out_features, side, **like)
        conv7 = nn.Conv2d(fc7.in_features, fc7.out_features, 1, **like)
        conv8 = nn.Conv2d(fc8.in_features, fc8.out_features, 1, **like)
        with torch.no_grad():
            # Linear weights flatten (C, H, W) in that order, as torch.flatten does.
            conv6.weight.copy_(fc6.weight.view(fc6.out_features, channels, side, side))
            conv7.weight.copy_(fc7.weight.view(*fc7.weight.shape, 1, 1))
            conv8.weight.copy_(fc8.weight.view(*fc8.weight.shape, 1, 1))
            for conv, fc in ((conv6, fc6), (conv7, fc7), (conv8, fc8)):
                conv.bias.copy_(fc.bias)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=conv6, relu6=nn.ReLU(inplace=True), fc7=conv7, relu7=nn.ReLU(inplace=True), fc8=conv8
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def dense_form(model: VGG) -> DenseVGG:
    """The fully convolutional form for dense evaluation (shares the conv layers)."""
    return DenseVGG(model).eval()


# ---------------------------------------------------------------- torchvision weights


def torchvision_key_map(model: VGG) -> dict[str, str]:
    """torchvision `vgg*`/`vgg*_bn` state-dict keys -> our keys.

    torchvision's `features` is a flat Sequential (Conv2d, [BatchNorm2d], ReLU, ...,
    MaxPool2d) and its classifier is (Linear, ReLU, Dropout) x2 + Linear; walking our
    named layers in the same order gives the index of each."""
    mapping: dict[str, str] = {}
    for index, (name, module) in enumerate(model.features.named_children()):
        for leaf, _ in module.named_parameters(recurse=False):
            mapping[f"features.{index}.{leaf}"] = f"features.{name}.{leaf}"
        for leaf, _ in module.named_buffers(recurse=False):
            mapping[f"features.{index}.{leaf}"] = f"features.{name}.{leaf}"
    for index, name in ((0, "fc6"), (3, "fc7"), (6, "fc8")):
        for leaf in ("weight", "bias"):
            mapping[f"classifier.{index}.{leaf}"] = f"classifier.{name}.{leaf}"
    return mapping


def load_torchvision_state(model: VGG, state: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision VGG state dict (e.g. vgg16's published weights) into our
    named layers. Shapes must match: build with the same config and batch_norm."""
    mapping = torchvision_key_map(model)
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise ValueError(
            f"not a torchvision {model.arch.name} state dict "
            f"(batch_norm={model.batch_norm}): missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    ours = model.state_dict()
    converted = {}
    for tv_key, our_key in mapping.items():
        if tuple(state[tv_key].shape) != tuple(ours[our_key].shape):
            raise ValueError(
                f"torchvision {tv_key} has shape {tuple(state[tv_key].shape)}, our "
                f"{our_key} has {tuple(ours[our_key].shape)}"
            )
        converted[our_key] = state[tv_key]
    model.load_state_dict(converted, strict=True)


# ---------------------------------------------------------------- summary


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmacs(arch: Arch, input_size: int = 224, num_classes: int = 1000, width_mult: float = 1.0) -> float:
    """Multiply-accumulates of one forward pass, in billions, computed from the table."""
    side, channels, macs = input_size, 3, 0
    for _, tok in arch.layer_names():
        if isinstance(tok, Conv):
            side = out_size(side, tok.k, tok.stride, tok.padding)
            out = _scaled(tok.out, width_mult)
            macs += side * side * out * channels * tok.k * tok.k
            channels = out
        elif isinstance(tok, Pool):
            side = out_size(side, tok.k, tok.stride, 0, tok.ceil)
    hidden = _scaled(arch.hidden, width_mult)
    macs += channels * side * side * hidden + hidden * hidden + hidden * num_classes
    return macs / 1e9


def summary_rows(names: list[str] | None = None) -> list[dict]:
    from pipeline.archs import ARCHS

    rows = []
    for name in names or list(ARCHS):
        arch = get_arch(name)
        with torch.device("meta"):  # shapes only: no 130M-parameter allocation
            model = VGG(arch)
        rows.append(
            dict(
                config=arch.name,
                weight_layers=arch.weight_layers,
                parameters=count_parameters(model),
                gmacs=round(gmacs(arch), 2),
                source=arch.source,
            )
        )
    return rows
