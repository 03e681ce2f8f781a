"""Plans and recipes: typed, validated, overridable; errors name the key, before Ray."""

from __future__ import annotations

import textwrap

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, from_dict, parse_yaml
from pipeline.stages import PLANS_DIR, Optim, Recipe, load_plan

MINI = """
name: mini
data: {root: /tmp/shards}
recipe: {crop: 64, epochs: 2, optim: {lr: 0.05, weight_decay: 5e-4}}
stages:
  A: {arch: A, scale: 72}
  B: {arch: B, scale: [72, 96], init_from: {stage: A}}
"""


def write(tmp_path, text: str):
    path = tmp_path / "plan.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_recipe_defaults_are_the_papers():
    r = Recipe()
    assert (r.batch_size, r.epochs, r.max_iterations, r.crop, r.dropout) == (256, 74, 370_000, 224, 0.5)
    o = Optim()
    assert (o.lr, o.momentum, o.weight_decay, o.lr_drop, o.max_drops) == (0.01, 0.9, 5e-4, 0.1, 3)


def test_plan_loads_merges_and_orders(tmp_path):
    plan = load_plan(write(tmp_path, MINI))
    a, b = plan.stages["A"], plan.stages["B"]
    assert a.recipe.optim.lr == 0.05 and a.recipe.optim.weight_decay == 5e-4  # "5e-4" is a float
    assert b.scale == (72, 96) and b.scale_range == (72, 96) and b.eval_scale == 84
    assert b.init_from.layers[0] == "conv1_1"
    assert [s.name for s in plan.order()] == ["A", "B"]


def test_overrides_dotted_and_shorthand(tmp_path):
    plan = load_plan(write(tmp_path, MINI), ["optim.lr=0.02", "stages.B.recipe.epochs=5", "data.root=/x"])
    assert plan.stages["A"].recipe.optim.lr == 0.02 and plan.stages["B"].recipe.optim.lr == 0.02
    assert plan.stages["B"].recipe.epochs == 5 and plan.stages["A"].recipe.epochs == 2
    assert plan.data.root == "/x"
    assert plan.fingerprint() != load_plan(write(tmp_path, MINI)).fingerprint()


@pytest.mark.parametrize(
    "override, message",
    [
        ("recipe.optim.lrr=0.1", r"recipe\.optim\.lrr: unknown key"),
        ("optim.lr=fast", r"recipe\.optim\.lr: expected float, got 'fast'"),
        ("stages.A.recipe.epochs=2.5", r"stages\.A\.recipe\.epochs: expected int"),
        ("stages.A.arch=Z", r"stages\.A\.arch: unknown architecture 'Z'"),
        ("stages.B.init_from.stage=Q", r"stages\.B\.init_from\.stage: no stage named 'Q'"),
        ("stages.B.init_from.layers=[conv9_9]", r"stages\.B\.init_from\.layers: .*conv9_9"),
        ("stages.A.scale=[96, 72]", r"stages\.A\.scale"),
        ("stages.A.init_from={stage: B}", r"cycle: A -> B -> A"),
        ("resources.num_workers=two", r"resources\.num_workers: expected int"),
        ("stages.B.init_from.layers=all", r"'all' needs the same config"),
        ("bogus=1", r"bogus: unknown key"),
        ("optim.warmup_epochs=-1", r"warmup_epochs must be 0 \(off\) or positive"),
        ("optim.patience=0", r"optim\.patience must be at least 1"),
        ("noequals", r"expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_plan(write(tmp_path, MINI), [override])


def test_from_dict_rejects_bool_for_int_and_missing_required():
    with pytest.raises(ConfigError, match="epochs: expected int, got True"):
        from_dict(Recipe, {"epochs": True})
    with pytest.raises(ConfigError, match="lr must be positive"):
        from_dict(Optim, {"lr": -1})
    assert parse_yaml("x: 1e-3")["x"] == 0.001


def test_shipped_plans_validate():
    paper = load_plan(PLANS_DIR / "paper.yaml")
    order = [s.name for s in paper.order()]
    assert order.index("A") < order.index("D-256") < order.index("D-384") < order.index("D-multi")
    assert paper.stages["D-384"].recipe.optim.lr == 1e-3 and paper.stages["D-multi"].scale == (256, 512)
    assert paper.stages["E-256"].init_from.stage == "A"
    demo = load_plan(PLANS_DIR / "demo.yaml")
    assert demo.stages["B"].init_from.stage == "A"


def test_invalid_plan_fails_before_ray_or_mlflow(tmp_path, capsys, monkeypatch):
    import ray

    db = tmp_path / "never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    started = []  # a tripwire: this test process may already hold another test's Ray session
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(a) or pytest.fail("Ray was started"))
    bad = write(tmp_path, MINI.replace("arch: B", "arch: Q"))
    assert cli_main(["train", "--plan", str(bad)]) == 2
    assert "stages.B.arch" in capsys.readouterr().err
    assert started == []
    assert not db.exists()  # MLflow was never touched


@pytest.mark.parametrize("arch, crop, valid, near", [
    ("A", 56, False, "32 or 64"),  # the last pool would floor 1.75 cells to 1
    ("D", 100, False, "96 or 128"),
    ("E", 224, True, ""),
    ("A", 64, True, ""),
    # VGG-F/M/S pool with Caffe's ceil rounding: no pool drops input, and conv1's stride-4
    # remainder at 224 (one border pixel, as in Chatfield et al.'s own nets) is tolerated.
    ("F", 224, True, ""),
    ("M", 200, True, ""),
])
def test_crop_must_fit_the_nets_strides(tmp_path, arch, crop, valid, near):
    path = write(tmp_path, f"name: c\ndata: {{root: /x}}\nrecipe: {{crop: {crop}}}\n"
                           f"stages: {{N: {{arch: {arch}, scale: 256}}}}\n")
    if valid:
        assert load_plan(path).stages["N"].recipe.crop == crop
        return
    with pytest.raises(ConfigError, match=rf"stages\.N\.recipe\.crop: {crop} does not fit net {arch}: .*; use {near}"):
        load_plan(path)


def test_a_plan_may_build_on_a_base_plan(tmp_path):
    (tmp_path / "base.yaml").write_text(textwrap.dedent(MINI))
    variant = tmp_path / "variant.yaml"
    variant.write_text("base: base.yaml\nname: variant\ndeviation: bigger batch\nrecipe: {batch_size: 512}\n"
                       "stages: {B: {recipe: {epochs: 7}}}\n")
    plan = load_plan(variant)
    assert plan.name == "variant" and plan.deviation == "bigger batch"
    assert plan.stages["A"].recipe.batch_size == 512 and plan.stages["A"].recipe.optim.lr == 0.05
    assert plan.stages["B"].recipe.epochs == 7 and plan.stages["B"].init_from.stage == "A"
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\nname: loop\n")
    with pytest.raises(ConfigError, match="base plans form a cycle"):
        load_plan(tmp_path / "loop.yaml")


def test_deviations_are_items_a_variant_adds_to_or_withdraws(tmp_path):
    (tmp_path / "base.yaml").write_text(textwrap.dedent(MINI) + "deviation: {bf16: autocast, fp16_in: half inputs}\n")
    variant = tmp_path / "variant.yaml"
    variant.write_text("base: base.yaml\nname: variant\ndeviation: {batch: bigger batch}\n")
    assert load_plan(variant).deviation == "bf16: autocast; fp16_in: half inputs; batch: bigger batch"
    assert load_plan(variant, ["deviation.bf16=null"]).deviation == "fp16_in: half inputs; batch: bigger batch"
    with pytest.raises(ConfigError, match="deviation.batch: expected a sentence"):
        load_plan(variant, ["deviation.batch=''"])


def test_paper_plan_follows_the_paper_or_declares_each_difference():
    """paper.yaml: weight decay on every parameter (followed); bf16 autocast and float16
    batches declared; the declaration reaches every stage run's MLflow tags and the
    report's recipe keys (paper-fast's batch item on top of them)."""
    from pipeline.report import StageRow, render
    from pipeline.booking import stage_tags
    from pipeline.stages import PLANS_DIR

    paper, fast = load_plan(PLANS_DIR / "paper.yaml"), load_plan(PLANS_DIR / "paper-fast.yaml")
    assert all(s.recipe.optim.decay_biases and s.recipe.optim.weight_decay == 5e-4 for s in paper.stages.values())
    assert all(s.recipe.precision in ("auto", "bf16") for s in paper.stages.values())  # hence declared:
    assert paper.deviation.startswith("bf16_autocast: ") and "; float16_batches: " in paper.deviation
    for plan in (paper, fast):
        tags = stage_tags(plan, plan.stages["D-multi"])
        assert tags["deviation"] == plan.deviation and plan.deviation in tags["recipe"]
        md = render(plan.experiment, [StageRow("D-multi", "D", "[256,512]", "r", {
            "dense_Q384/top1_error": 25.0, "dense_Q384/top5_error": 8.0}, tags["recipe"])], [])
        assert f"| R1 | {tags['recipe']} |" in md and "bf16 autocast" in md
    assert "global_batch: global batch 2048" in fast.deviation and "global batch" not in paper.deviation
