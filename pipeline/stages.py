"""Plans as data: the paper's staged schedule (net A, deeper nets initialised from
A, then S=384 and scale jittering) as a validated graph of stages.

A plan YAML has a plan-wide `recipe` and `resources`; each stage may override any
part of them. Everything is checked (keys, types, archs, the init_from graph)
by `load_plan`, before Ray or MLflow is asked for anything.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.archs import PAPER_INIT_LAYERS, crop_ok, get_arch, nearest_crops, unseen_input
from pipeline.config import ConfigError, apply_override, deep_merge, from_dict, load_yaml, to_dict


@dataclass(frozen=True)
class Optim:
    lr: float = 0.01  # Section 3.1, at batch 256
    reference_batch: int = 256  # the batch `lr` is quoted for
    scale_lr: bool = True  # linear scaling with the global batch (Goyal et al.)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_biases: bool = False  # weight decay on 1-d tensors (biases, BN) too; the paper (and Caffe's default): yes
    lr_drop: float = 0.1  # "decreased by a factor of 10 when validation accuracy stopped improving"
    patience: int = 2  # epochs in a row without an improvement before a drop
    threshold: float = 0.005  # an improvement must beat the best error by this share (relative)
    min_epochs_before_drop: int = 5  # after warmup: no drop before this many epochs
    cooldown: int = 1  # epochs after a drop that are not judged
    max_drops: int = 3  # "the learning rate was decreased 3 times"
    warmup_epochs: float = 0.0  # linear lr warmup per step (Goyal et al. 2017); 0: off, as in the paper
    warmup_start_factor: float = 0.1  # the warmup starts at this share of the lr
    grad_clip: float | None = None  # max global grad norm; None: no clipping
    # SGD kernels: "auto" fused on GPU, foreach elsewhere; "fused" or "foreach" on any device
    # (fused on the CPU rehearses the GPU's optimiser step in CI)
    impl: Literal["auto", "foreach", "fused"] = "auto"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0 < self.lr_drop < 1:
            raise ValueError(f"optim.lr_drop must be in (0, 1), got {self.lr_drop}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be 0 (off) or positive, got {self.warmup_epochs}")
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError(f"optim.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"optim.threshold must be in [0, 1), got {self.threshold}")
        for name in ("patience", "min_epochs_before_drop", "cooldown", "max_drops"):
            if getattr(self, name) < (1 if name == "patience" else 0):
                raise ValueError(f"optim.{name} must be at least {1 if name == 'patience' else 0}, "
                                 f"got {getattr(self, name)}")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 74  # Section 3.1: stopped after 74 epochs
    max_iterations: int | None = 370_000  # ... or 370K iterations of batch 256
    batch_size: int = 256  # global, across all workers
    crop: int = 224
    width_mult: float = 1.0
    batch_norm: bool = False
    dropout: float = 0.5
    init: Literal["paper", "glorot", "kaiming"] = "paper"
    init_std: float = 0.01
    color_shift: float = 0.1  # std of AlexNet's PCA lighting noise; 0 turns it off
    eval_scale: int | None = None  # Q for per-epoch validation; None: S (or the jitter mid-point)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU; bf16: on any device
    channels_last: bool | None = None  # None: on GPU only; true/false: on/off on any device
    # torch.compile: true = inductor (what a GPU run uses); "aot_eager" captures and splits the
    # graph the same way (Dynamo, DDP's graph splitting, AOTAutograd) without code generation.
    compile: bool | Literal["inductor", "aot_eager"] = False
    normalize_std: bool = False  # also divide by the training set's RGB std (the paper only subtracts the mean)
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0: at epoch ends only)
    # Stall guard: a stage whose val top-1 error is still within `chance_margin` points of
    # chance (1 - 1/classes) `stall_epochs` epochs after warmup FAILS instead of finishing.
    stall_epochs: int = 3  # 0: off
    chance_margin: float = 2.0  # error points
    seed: int = 0
    optim: Optim = field(default_factory=Optim)

    def epochs_for(self, train_images: int) -> int:
        """74 epochs or 370K iterations of batch 256, whichever comes first (Section 3.1)."""
        if self.max_iterations is None:
            return self.epochs
        return min(self.epochs, math.ceil(self.max_iterations * 256 / max(train_images, 1)))

    def __post_init__(self):
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be 0 (off) or positive, got {self.checkpoint_every_steps}")
        for name in ("epochs", "batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {self.width_mult}")
        if self.stall_epochs < 0 or self.chance_margin < 0:
            raise ValueError(f"stall_epochs and chance_margin must be 0 or positive, got "
                             f"{self.stall_epochs} and {self.chance_margin}")


@dataclass(frozen=True)
class Resources:
    # An int: a fixed-size stage. [min, max]: elastic (Ray Train's ScalingConfig(num_workers=(min, max))):
    # the stage starts on as many workers as fit (at least min), shrinks when nodes go and grows
    # back when they return; the recipe (global batch, lr curve, steps) is the same at any size.
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # Ray Train restarts from the last checkpoint this many times
    # Restarts after a node is taken back (a drained or preempted node), counted apart from
    # max_failures; -1: no limit (spot capacity comes and goes for the life of a stage).
    max_preemption_failures: int = -1
    # The most images one worker's micro-batch may hold (its memory); a worker whose share of
    # the global batch is larger takes it in several micro-batches (gradient accumulation).
    # None: the whole share at once.
    max_worker_batch: int | None = None
    # An elastic stage looks for more capacity this often (Ray Train's
    # elastic_resize_monitor_interval_s); each grow restarts the group from the latest checkpoint.
    resize_check_s: float = 60.0

    def __post_init__(self):
        lo, hi = self.worker_range
        if lo < 1 or hi < lo:
            raise ValueError(f"num_workers: expected a count of at least 1, or [min, max] with 1 <= min <= max, "
                             f"got {list(self.num_workers) if self.elastic else self.num_workers}")
        if self.max_worker_batch is not None and self.max_worker_batch < 1:
            raise ValueError(f"max_worker_batch must be at least 1, got {self.max_worker_batch}")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; (n, n) for a fixed-size stage."""
        return tuple(self.num_workers) if self.elastic else (self.num_workers, self.num_workers)

    @property
    def min_workers(self) -> int:
        return self.worker_range[0]

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]


@dataclass(frozen=True)
class Data:
    root: str  # output of data_prep/shard.py: <split>/*.tar, stats.json, classes.json
    train_split: str = "train"
    val_split: str = "val"
    reader_threads: int = 2  # DALI CPU threads per worker
    # GPU training decode: "roi" decodes only the crop window; "whole" decodes the whole
    # image (the hardware JPEG decoder can) and resizes the window on the GPU. Same
    # geometry; `python -m pipeline bench gpu` says which is faster on a machine.
    gpu_decode: Literal["roi", "whole"] = "roi"
    # A training sample DALI cannot decode: "fail" stops the stage on every rank, naming
    # shard and key; "skip" reads a neighbour in its place and counts it (skipped_samples).
    on_corrupt_sample: Literal["fail", "skip"] = "fail"
    # A folder where every rank appends what it trained on, one line per image: epoch,
    # step, key (an audit of the exactly-once order across resizes; the elastic test
    # reads it). None: off. On ImageNet about 30 MB an epoch.
    keys_log: str | None = None


@dataclass(frozen=True)
class InitFrom:
    stage: str
    # Layer names to copy, or "all" to fine-tune a whole net of the same config.
    layers: tuple[str, ...] | Literal["all"] = PAPER_INIT_LAYERS


@dataclass(frozen=True)
class Stage:
    name: str
    arch: str
    scale: int | tuple[int, int]  # S, or [Smin, Smax] for scale jittering
    recipe: Recipe
    resources: Resources
    init_from: InitFrom | None = None

    @property
    def scale_range(self) -> tuple[int, int]:
        return (self.scale, self.scale) if isinstance(self.scale, int) else self.scale

    @property
    def eval_scale(self) -> int:
        lo, hi = self.scale_range
        return self.recipe.eval_scale or (lo + hi) // 2  # Table 3: Q = 384 for [256, 512]

    @property
    def scale_label(self) -> str:
        lo, hi = self.scale_range
        return str(lo) if lo == hi else f"[{lo},{hi}]"


@dataclass(frozen=True)
class Plan:
    name: str
    experiment: str
    data: Data
    storage: str  # checkpoints: a local path or s3://
    stages: dict[str, Stage]
    source: str = ""  # the YAML file it was read from
    deviation: str = ""  # how the recipe departs from the paper's ("" = the paper's recipe), items "; "-joined

    @property
    def recipe_label(self) -> str:
        """Which recipe produced a number: the plan's name, and its deviation if any."""
        return f"{self.name} (deviation from the paper: {self.deviation})" if self.deviation else self.name

    def fingerprint(self) -> str:
        """Hash of everything that changes what is trained (used in run names)."""
        blob = json.dumps(to_dict(self) | {"source": ""}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def order(self) -> list[Stage]:
        """Stages in dependency order (the plan's order where free)."""
        done: list[str] = []
        pending = list(self.stages)
        while pending:
            for name in pending:
                src = self.stages[name].init_from
                if src is None or src.stage in done:
                    done.append(name)
                    pending.remove(name)
                    break
            else:  # validate() already rejects cycles; be safe anyway
                raise ConfigError(f"stages {pending} form a cycle through init_from")
        return [self.stages[n] for n in done]


_PLAN_KEYS = {"name", "experiment", "data", "storage", "recipe", "resources", "stages", "deviation"}
_RECIPE_KEYS = set(Recipe.__dataclass_fields__)


def _expand_shorthand(assignment: str) -> str:
    """`optim.lr=0.02` is shorthand for `recipe.optim.lr=0.02` (every stage)."""
    head = assignment.split("=", 1)[0].split(".", 1)[0].strip()
    if head in _RECIPE_KEYS and head not in _PLAN_KEYS:
        return f"recipe.{assignment}"
    return assignment


def parse_plan(raw: dict, source: str = "") -> Plan:
    unknown = sorted(set(raw) - _PLAN_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_PLAN_KEYS))})")
    for key in ("name", "data", "stages"):
        if key not in raw:
            raise ConfigError(f"{key}: required key is missing")
    if not isinstance(raw["stages"], dict) or not raw["stages"]:
        raise ConfigError("stages: expected a non-empty mapping of stage name to stage")
    base_recipe = raw.get("recipe") or {}
    base_resources = raw.get("resources") or {}
    from_dict(Recipe, base_recipe, "recipe")  # report plan-level errors under their own key
    from_dict(Resources, base_resources, "resources")
    stages = {}
    for name, body in raw["stages"].items():
        where = f"stages.{name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a mapping")
        allowed = {"arch", "scale", "recipe", "resources", "init_from"}
        extra = sorted(set(body) - allowed)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown key (known: {', '.join(sorted(allowed))})")
        merged = dict(
            body,
            name=str(name),
            recipe=deep_merge(base_recipe, body.get("recipe") or {}),
            resources=deep_merge(base_resources, body.get("resources") or {}),
        )
        stages[str(name)] = from_dict(Stage, merged, where)
    plan = Plan(
        name=_req_str(raw, "name"),
        experiment=str(raw.get("experiment") or raw["name"]),
        data=from_dict(Data, raw["data"], "data"),
        storage=str(raw.get("storage") or "runs"),
        stages=stages,
        source=source,
        deviation=_deviation(raw.get("deviation")),
    )
    validate(plan)
    return plan


def _deviation(raw) -> str:
    """`deviation:` is one sentence, or a mapping of item -> sentence (a variant plan's
    items add to its base plan's; an item set to null is withdrawn). One line, items in order."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, dict):
        for key, text in raw.items():
            if text is not None and not (isinstance(text, str) and text.strip()):
                raise ConfigError(f"deviation.{key}: expected a sentence saying how the recipe differs, got {text!r}")
        return "; ".join(f"{key}: {text.strip()}" for key, text in raw.items() if text is not None)
    raise ConfigError(f"deviation: expected a sentence or a mapping of item -> sentence, got {raw!r}")


def _req_str(raw: dict, key: str) -> str:
    if not isinstance(raw[key], str) or not raw[key]:
        raise ConfigError(f"{key}: expected a non-empty string, got {raw[key]!r}")
    return raw[key]


def _check_batch_split(st: Stage, where: str) -> None:
    """The global batch must lie on every world size the stage may run at (pipeline/order.py,
    split_batch): refused here, not hours later at a resize. A batch that does not divide
    over the workers is fine (shares of B // W and one more, weighted); fewer images than
    workers, or micro-batches so small that one would be empty, are not."""
    from pipeline.order import split_batch

    lo, hi = st.resources.worker_range
    for w in range(lo, hi + 1):
        try:
            split_batch(st.recipe.batch_size, w, st.resources.max_worker_batch)
        except ValueError as exc:
            raise ConfigError(f"{where}.recipe.batch_size: {exc} (resources.num_workers allows "
                              f"{list(st.resources.worker_range) if st.resources.elastic else w})") from None


def validate(plan: Plan) -> None:
    """Check the stage graph: archs exist, init_from sources exist, no cycles, layer
    names exist in both nets, scales are sane."""
    for st in plan.stages.values():
        where = f"stages.{st.name}"
        try:
            arch = get_arch(st.arch)
        except KeyError as exc:
            raise ConfigError(f"{where}.arch: {exc.args[0]}") from None
        crop = st.recipe.crop
        if not crop_ok(arch, crop):
            near = " or ".join(str(c) for c in nearest_crops(arch, crop))
            try:
                why = (f"{unseen_input(arch, crop)} of its {crop} input pixels would go unseen (a pool or "
                       "strided layer floors away whole cells), and dense evaluation would disagree with single-crop")
            except ValueError:
                why = "the input is smaller than one of its kernels"
            raise ConfigError(f"{where}.recipe.crop: {crop} does not fit net {arch.name}: {why}; use {near}")
        _check_batch_split(st, where)
        lo, hi = st.scale_range
        if lo < st.recipe.crop or hi < lo:
            raise ConfigError(
                f"{where}.scale: need crop ({st.recipe.crop}) <= Smin <= Smax, got {st.scale}"
            )
        src_ref = st.init_from
        if src_ref is None:
            continue
        if src_ref.stage not in plan.stages:
            raise ConfigError(f"{where}.init_from.stage: no stage named {src_ref.stage!r}")
        src = plan.stages[src_ref.stage]
        src_arch = get_arch(src.arch)
        if src_ref.layers == "all":
            if src_arch.name != arch.name:
                raise ConfigError(
                    f"{where}.init_from.layers: 'all' needs the same config, "
                    f"but {src.name} is {src_arch.name} and {st.name} is {arch.name}"
                )
            continue
        names = {n for n, _ in arch.layer_names()} | {"fc6", "fc7", "fc8"}
        src_names = {n for n, _ in src_arch.layer_names()} | {"fc6", "fc7", "fc8"}
        for layer in src_ref.layers:
            if layer not in names or layer not in src_names:
                owner = st.name if layer not in names else src.name
                raise ConfigError(f"{where}.init_from.layers: {owner} has no layer {layer!r}")
    # Cycles: follow init_from from every stage.
    for start in plan.stages:
        seen, cur = [start], plan.stages[start].init_from
        while cur is not None:
            if cur.stage in seen:
                chain = " -> ".join(seen + [cur.stage])
                raise ConfigError(f"stages: init_from forms a cycle: {chain}")
            seen.append(cur.stage)
            cur = plan.stages[cur.stage].init_from


def _read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A plan may name a `base` plan (a path relative to itself) that it overrides key by
    key, stages included: a variant of paper.yaml states only what differs."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: base plans form a cycle")
    raw = load_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a plan file name, got {base!r}")
    base_path = (path.parent / base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no such plan {base_path}")
    return deep_merge(_read_with_base(base_path, seen + (path,)), raw)


def load_plan(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """Read (over its `base` plan, if any), override (`recipe.optim.lr=0.02`,
    `stages.A.recipe.epochs=3`) and validate."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    raw = _read_with_base(Path(path))
    for assignment in overrides:
        raw = apply_override(raw, _expand_shorthand(assignment))
    return parse_plan(raw, source=str(path))


PLANS_DIR = Path(__file__).parent / "plans"
