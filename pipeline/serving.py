"""Registered models that classify images on their own: the net(s), the preprocessing
they were trained with, and the class names, in one folder (a "bundle").

`Classifier.predict(images)` takes JPEG bytes (or their base64, as JSON requests carry
them) or uint8 arrays (H x W x 3, or H x W)
and returns, per image, the class id and name and the top-5 classes with their
probabilities. The preprocessing is the pipeline's evaluation: rescale so the shorter
side is Q and take the centre crop (the crop window cut in source pixels and resized,
as the DALI graph does), subtract the training mean RGB (and divide by its std where
the net was trained so); or, with mode "dense", the whole rescaled image through the
fully convolutional net and its flip. An ensemble averages its members' softmax, each
member with its own preprocessing. Plain torch and Pillow: MLflow wraps it (tracking.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

BUNDLE_META, BUNDLE_WEIGHTS = "bundle.json", "weights.pt"


@dataclass(frozen=True)
class Member:
    arch: str
    num_classes: int
    width_mult: float
    batch_norm: bool
    crop: int
    scale: int  # Q
    mean_rgb: tuple[float, float, float]
    std_rgb: tuple[float, float, float] | None  # None: the paper's mean subtraction only
    mode: str = "centre"  # or "dense"


def _rgb(image, index: int):
    from PIL import Image

    if isinstance(image, str):  # base64 (JSON requests: `mlflow models predict`, model serving)
        import base64
        import binascii

        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image {index}: a string must be base64-encoded image bytes") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(image))).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - named per image below
            raise ValueError(f"image {index}: not a decodable image ({type(exc).__name__})") from None
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image {index}: expected JPEG bytes or a uint8 array H x W [x 3], got "
                         f"{arr.dtype} {arr.shape}")
    return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[2] == 1 else arr).convert("RGB")


def _normalise(img, m: Member) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    x = x - torch.tensor(m.mean_rgb).view(3, 1, 1)
    return x / torch.tensor(m.std_rgb).view(3, 1, 1) if m.std_rgb else x


def centre_crop(img, m: Member) -> torch.Tensor:
    """Rescale to Q and cut the centre crop, as one resize of the crop's window in the
    source (the DALI graph's geometry; Pillow's bilinear filter widens when it shrinks)."""
    from PIL import Image

    w, h = img.size
    side = m.crop * min(w, h) / m.scale
    x, y = (w - side) / 2, (h - side) / 2
    out = img.resize((m.crop, m.crop), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
    return _normalise(out, m)


def rescaled(img, m: Member) -> torch.Tensor:
    from PIL import Image

    w, h = img.size
    r = m.scale / min(w, h)
    return _normalise(img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BILINEAR), m)


class Classifier:
    def __init__(self, nets: list[torch.nn.Module], members: list[Member], classes: list[dict]):
        from pipeline.models import dense_form

        self.members, self.classes = members, classes
        self.nets = [(dense_form(n) if m.mode == "dense" else n).eval() for n, m in zip(nets, members)]

    @torch.no_grad()
    def probabilities(self, images) -> np.ndarray:
        pics = [_rgb(im, i) for i, im in enumerate(images)]
        total = None
        for net, m in zip(self.nets, self.members):
            if m.mode == "dense":
                probs = []
                for pic in pics:
                    x = rescaled(pic, m)[None]
                    both = [torch.softmax(net(v).mean(dim=(2, 3)), 1) for v in (x, x.flip(3))]
                    probs.append((both[0] + both[1]) / 2)
                p = torch.cat(probs)
            else:
                p = torch.softmax(net(torch.stack([centre_crop(pic, m) for pic in pics])), 1)
            total = p if total is None else total + p
        return (total / len(self.nets)).numpy()

    def predict(self, images) -> list[dict]:
        probs = self.probabilities(images)
        out = []
        for row in probs:
            top = np.argsort(-row)[:5]
            out.append({"class_id": int(top[0]), "class_name": self.name(int(top[0])),
                        "top5_ids": [int(i) for i in top], "top5_names": [self.name(int(i)) for i in top],
                        "top5_probs": [float(row[i]) for i in top]})
        return out

    def name(self, i: int) -> str:
        return self.classes[i].get("name", str(i)) if i < len(self.classes) else str(i)


def write_bundle(folder: str | Path, nets: list[torch.nn.Module], members: list[Member], classes: list[dict]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save([n.state_dict() for n in nets], folder / BUNDLE_WEIGHTS)
    (folder / BUNDLE_META).write_text(json.dumps({"members": [asdict(m) for m in members], "classes": classes}))
    return folder


def load_bundle(folder: str | Path) -> Classifier:
    from pipeline.models import build_model

    folder = Path(folder)
    meta = json.loads((folder / BUNDLE_META).read_text())
    members = [Member(**{**m, "mean_rgb": tuple(m["mean_rgb"]),
                         "std_rgb": tuple(m["std_rgb"]) if m["std_rgb"] else None}) for m in meta["members"]]
    states = torch.load(folder / BUNDLE_WEIGHTS, map_location="cpu", weights_only=True)
    nets = []
    for m, state in zip(members, states):
        net = build_model(m.arch, num_classes=m.num_classes, width_mult=m.width_mult, batch_norm=m.batch_norm,
                          input_size=m.crop)
        net.load_state_dict(state)
        nets.append(net)
    return Classifier(nets, members, meta["classes"])
