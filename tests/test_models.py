"""The model zoo against the papers: exact counts, names, dense form, transfer by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.archs import ARCHS, PAPER_INIT_LAYERS, feature_side, get_arch
from pipeline.models import (
    VGG,
    build_model,
    count_parameters,
    dense_form,
    init_from,
    load_torchvision_state,
    torchvision_key_map,
)

# Simonyan & Zisserman Table 2 / torchvision; Chatfield et al. as read in PAPER.md.
PAPER_COUNTS = {
    "A": (132_863_336, 11), "A-LRN": (132_863_336, 11), "B": (133_047_848, 13), "C": (133_638_952, 16),
    "D": (138_357_544, 16), "E": (143_667_240, 19), "F": (60_834_536, 8), "M": (102_908_520, 8),
    "S": (102_908_520, 8),
}


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_exact_parameter_and_weight_layer_counts(name):
    with torch.device("meta"):
        model = VGG(get_arch(name))
    params, layers = PAPER_COUNTS[name]
    assert count_parameters(model) == params
    assert get_arch(name).weight_layers == layers
    assert len(model.weight_layers()) == layers


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_config_runs_forward_at_reduced_width(name):
    model = build_model(name, num_classes=7, width_mult=0.0625, input_size=224 if name in "FMS" else 64).eval()
    x = torch.randn(2, 3, model.input_size, model.input_size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_aliases_and_caffe_names():
    assert get_arch("vgg16") is ARCHS["D"] and get_arch("vgg11") is ARCHS["A"]
    assert get_arch("vgg13") is ARCHS["B"] and get_arch("vgg19") is ARCHS["E"]
    e = build_model("vgg19", width_mult=0.0625, input_size=32)
    convs = [n for n in e.weight_layers() if n.startswith("conv")]
    assert convs[0] == "conv1_1" and convs[-1] == "conv5_4" and len(convs) == 16
    lrn = build_model("A-LRN", width_mult=0.0625, input_size=32)
    names = [n for n, _ in lrn.features.named_children()]
    assert names[:3] == ["conv1_1", "relu1_1", "lrn1"] and "pool5" in names
    assert isinstance(lrn.features.lrn1, nn.LocalResponseNorm) and lrn.features.lrn1.k == 2.0
    c = build_model("C", width_mult=0.0625, input_size=32)
    assert c.features.conv3_3.kernel_size == (1, 1) and c.features.conv3_2.kernel_size == (3, 3)
    f = build_model("F", width_mult=0.0625)
    assert [n for n in f.weight_layers()][:5] == ["conv1", "conv2", "conv3", "conv4", "conv5"]


def test_feature_map_sides_match_the_papers():
    assert feature_side(ARCHS["D"], 224) == 7
    for name in "FMS":  # Chatfield: fc6 sees 6x6 in every net
        assert feature_side(ARCHS[name], 224) == 6
    # F: 27x27 after conv1's pool, 13x13 after conv2's (the seed notes)
    f = build_model("F", width_mult=0.0625).eval()
    x = torch.zeros(1, 3, 224, 224)
    sizes = {}
    for n, m in f.features.named_children():
        x = m(x)
        sizes[n] = x.shape[-1]
    assert sizes["pool1"] == 27 and sizes["pool2"] == 13


# Feature-map side after every conv, LRN and pool at 224, written out from the published
# definitions, not computed by our code: Simonyan & Zisserman Table 1 (3x3 convs pad 1 keep
# the side, 2x2/2 pools halve it); Chatfield et al. Table 1 with the released VGG_CNN_F/M/S
# Caffe models' pool kernels and Caffe's round-up (PAPER.md: S is conv1 109, pool1 37,
# conv2 35, pool2 18, conv3-5 18, pool5 6).
SIDES_AT_224 = {
    "A": "conv1_1 224 pool1 112 conv2_1 112 pool2 56 conv3_1 56 conv3_2 56 "
         "pool3 28 conv4_1 28 conv4_2 28 pool4 14 conv5_1 14 conv5_2 14 pool5 7",
    "A-LRN": "conv1_1 224 lrn1 224 pool1 112 conv2_1 112 pool2 56 conv3_1 56 conv3_2 56 "
             "pool3 28 conv4_1 28 conv4_2 28 pool4 14 conv5_1 14 conv5_2 14 pool5 7",
    "B": "conv1_1 224 conv1_2 224 pool1 112 conv2_1 112 conv2_2 112 pool2 56 conv3_1 56 conv3_2 56 "
         "pool3 28 conv4_1 28 conv4_2 28 pool4 14 conv5_1 14 conv5_2 14 pool5 7",
    "C": "conv1_1 224 conv1_2 224 pool1 112 conv2_1 112 conv2_2 112 pool2 56 conv3_1 56 conv3_2 56 conv3_3 56 "
         "pool3 28 conv4_1 28 conv4_2 28 conv4_3 28 pool4 14 conv5_1 14 conv5_2 14 conv5_3 14 pool5 7",
    "D": "conv1_1 224 conv1_2 224 pool1 112 conv2_1 112 conv2_2 112 pool2 56 conv3_1 56 conv3_2 56 conv3_3 56 "
         "pool3 28 conv4_1 28 conv4_2 28 conv4_3 28 pool4 14 conv5_1 14 conv5_2 14 conv5_3 14 pool5 7",
    "E": "conv1_1 224 conv1_2 224 pool1 112 conv2_1 112 conv2_2 112 "
         "pool2 56 conv3_1 56 conv3_2 56 conv3_3 56 conv3_4 56 pool3 28 conv4_1 28 conv4_2 28 conv4_3 28 conv4_4 28 "
         "pool4 14 conv5_1 14 conv5_2 14 conv5_3 14 conv5_4 14 pool5 7",
    # F: 11x11/4 pad 0: floor(213/4)+1 = 54; 3x3/2 pools round up: 27, 13, 6.
    "F": "conv1 54 lrn1 54 pool1 27 conv2 27 lrn2 27 pool2 13 conv3 13 conv4 13 conv5 13 pool5 6",
    # M: 7x7/2 pad 0: 109; pool 54; 5x5/2 pad 1: 26; pool 13; pool5 6.
    "M": "conv1 109 lrn1 109 pool1 54 conv2 26 lrn2 26 pool2 13 conv3 13 conv4 13 conv5 13 pool5 6",
    # S: 7x7/2: 109; 3x3/3 pool: 37; 5x5/1 pad 1: 35; 2x2/2 pool: 18; 3x3/3 pool: 6.
    "S": "conv1 109 lrn1 109 pool1 37 conv2 35 pool2 18 conv3 18 conv4 18 conv5 18 pool5 6",
}


@pytest.mark.parametrize("name", list(SIDES_AT_224))
def test_feature_map_side_after_every_layer_matches_the_published_net(name):
    published = SIDES_AT_224[name].split()
    expected = list(zip(published[::2], map(int, published[1::2])))
    model = build_model(name, num_classes=10, width_mult=0.0625).eval()
    x, seen = torch.zeros(1, 3, 224, 224), []
    with torch.no_grad():
        for layer, module in model.features.named_children():
            x = module(x)
            if layer.startswith(("conv", "lrn", "pool")):
                seen.append((layer, x.shape[-1]))
                assert x.shape[-1] == x.shape[-2], layer
    assert seen == expected
    assert feature_side(get_arch(name), 224) == expected[-1][1]


def _krizhevsky_lrn(a: np.ndarray, n=5, k=2.0, alpha=1e-4, beta=0.75) -> np.ndarray:
    """Krizhevsky et al. (2012), Section 3.3, written out channel by channel:
    b_i = a_i / (k + alpha * sum_{j = max(0, i - n/2)}^{min(N - 1, i + n/2)} a_j^2)^beta."""
    channels = a.shape[1]
    b = np.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        total = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        b[:, i] = a[:, i] / (k + alpha * total) ** beta
    return b


@pytest.mark.parametrize("name", ["A-LRN", "F", "M", "S"])
def test_lrn_is_krizhevskys_formula(name):
    model = build_model(name, num_classes=10, width_mult=0.0625, input_size=224 if name in "FMS" else 32)
    lrns = [m for n, m in model.features.named_children() if n.startswith("lrn")]
    assert len(lrns) == (1 if name in ("A-LRN", "S") else 2)
    # ReLU-sized activations: non-negative, tens of units, as after conv1 on 0-255 inputs.
    a = np.random.default_rng(0).uniform(0, 60, size=(2, 9, 4, 3))
    expected = _krizhevsky_lrn(a)
    for lrn in lrns:
        got = lrn(torch.from_numpy(a)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-9)
    # At this size the sum term matters: Caffe's convention misread as Krizhevsky's (alpha
    # divided by 5 once more) is off by well over the tolerance.
    assert np.abs(_krizhevsky_lrn(a, alpha=2e-5) / expected - 1).max() > 0.1


def test_width_mult_and_input_size_shape_the_head():
    m = build_model("A", num_classes=10, width_mult=0.125, input_size=64)
    assert m.features.conv1_1.out_channels == 8
    assert m.classifier.fc6.in_features == 64 * 2 * 2  # 512 * 0.125 channels, 64 / 32 side
    assert m.classifier.fc7.in_features == 512
    with pytest.raises(ValueError, match="dense_form"):
        m(torch.zeros(1, 3, 96, 96))


@pytest.mark.parametrize("scheme", ["paper", "glorot", "kaiming"])
def test_init_schemes(scheme):
    m = build_model("A", width_mult=0.25, input_size=32, init=scheme, init_std=0.01)
    w = m.features.conv4_1.weight.detach()
    assert all(float(p.bias.detach().abs().max()) == 0 for p in m.weight_layers().values())
    if scheme == "paper":
        assert abs(float(w.std()) - 0.01) < 0.001
    elif scheme == "kaiming":  # He, fan-out: std = sqrt(2 / (out * 9))
        assert abs(float(w.std()) - (2 / (w.shape[0] * 9)) ** 0.5) < 0.1 * (2 / (w.shape[0] * 9)) ** 0.5
    with pytest.raises(ValueError, match="unknown init"):
        build_model("A", width_mult=0.25, input_size=32, init="orthogonal")


def test_dense_form_equals_fc_form_at_224_and_maps_larger_inputs():
    torch.manual_seed(0)
    model = build_model("A", num_classes=11, width_mult=0.0625, init="kaiming").eval()
    x = torch.randn(2, 3, 224, 224)
    dense = dense_form(model)
    with torch.no_grad():
        fc, scores = model(x), dense(x)
    assert scores.shape == (2, 11, 1, 1)
    torch.testing.assert_close(scores[:, :, 0, 0], fc, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        big = dense(torch.randn(1, 3, 288, 352))
    assert big.shape == (1, 11, 3, 5)  # (288/32 - 7 + 1, 352/32 - 7 + 1)


@pytest.mark.parametrize("target_name", ["B", "C", "D", "E"])
def test_init_from_a_copies_exactly_the_papers_layers(target_name):
    torch.manual_seed(0)
    a = build_model("A", num_classes=10, width_mult=0.0625, input_size=64)
    target = build_model(target_name, num_classes=10, width_mult=0.0625, input_size=64)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    transfer = init_from(target, a, PAPER_INIT_LAYERS)
    assert set(transfer.copied) == set(PAPER_INIT_LAYERS)
    assert set(transfer.left) == set(target.weight_layers()) - set(PAPER_INIT_LAYERS)
    src = a.state_dict()
    for key, value in target.state_dict().items():
        layer = key.split(".")[-2]
        if layer in PAPER_INIT_LAYERS:
            assert torch.equal(value, src[key]), key
        else:
            assert torch.equal(value, before[key]), key


def test_init_from_checkpoint_file_and_errors(tmp_path):
    a = build_model("A", num_classes=10, width_mult=0.0625, input_size=64)
    path = tmp_path / "a.pt"
    torch.save({"model": {f"module.{k}": v for k, v in a.state_dict().items()}}, path)  # DDP-style keys
    b = build_model("B", num_classes=10, width_mult=0.0625, input_size=64)
    init_from(b, path, ["conv1_1"])
    assert torch.equal(b.features.conv1_1.weight, a.features.conv1_1.weight)
    wide = build_model("B", num_classes=10, width_mult=0.125, input_size=64)
    with pytest.raises(ValueError, match="conv1_1.*shape"):
        init_from(wide, a, ["conv1_1"])
    with pytest.raises(ValueError, match="conv3_3"):
        init_from(b, a, ["conv3_3"])  # D has it, A does not


def _torchvision_shaped_state(model: VGG) -> dict:
    """A state dict with torchvision's key layout, built from its rules (no download):
    features.<i> counts Conv2d, [BatchNorm2d], ReLU, MaxPool2d in order;
    classifier is Linear(0), ReLU, Dropout, Linear(3), ReLU, Dropout, Linear(6)."""
    g = torch.Generator().manual_seed(1)
    state, index = {}, 0
    for module in model.features.children():
        if isinstance(module, nn.Conv2d):
            state[f"features.{index}.weight"] = torch.randn(module.weight.shape, generator=g)
            state[f"features.{index}.bias"] = torch.randn(module.bias.shape, generator=g)
        elif isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                state[f"features.{index}.{leaf}"] = torch.rand(n, generator=g)
            state[f"features.{index}.num_batches_tracked"] = torch.tensor(5)
        index += 1
    for i, fc in ((0, model.classifier.fc6), (3, model.classifier.fc7), (6, model.classifier.fc8)):
        state[f"classifier.{i}.weight"] = torch.randn(fc.weight.shape, generator=g)
        state[f"classifier.{i}.bias"] = torch.randn(fc.bias.shape, generator=g)
    return state


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_state_dict_maps_onto_named_layers(batch_norm):
    model = build_model("D", width_mult=0.0625, input_size=64, batch_norm=batch_norm)
    tv = _torchvision_shaped_state(model)
    # torchvision's vgg16 has 13 convs at these indices (30 feature modules without BN).
    if not batch_norm:
        assert "features.28.weight" in tv and "features.0.weight" in tv and len(model.features) == 31
    load_torchvision_state(model, tv)
    assert torch.equal(model.features.conv1_1.weight, tv["features.0.weight"])
    assert torch.equal(model.classifier.fc8.bias, tv["classifier.6.bias"])
    last_conv = max(k for k, v in torchvision_key_map(model).items() if v == "features.conv5_3.weight")
    assert torch.equal(model.features.conv5_3.weight, tv[last_conv])
    if batch_norm:
        assert torch.equal(model.features.bn1_1.running_var, tv["features.1.running_var"])
    tv.pop("classifier.6.bias")
    with pytest.raises(ValueError, match="missing"):
        load_torchvision_state(model, tv)


# ---------------------------------------------------------------- where tensors are made (issue 20)


def test_dense_form_builds_conv6_8_on_the_nets_device_and_dtype():
    """A float64 net (torch's default dtype stays float32): a layer made at the default
    dtype fails loudly ("Input type (double) and bias type (float)"); made like the
    net's own, the dense form equals the fc form."""
    torch.manual_seed(0)
    model = build_model("A", num_classes=5, width_mult=0.0625, input_size=64, init="kaiming").double().eval()
    assert torch.get_default_dtype() == torch.float32
    dense = dense_form(model)
    assert {p.dtype for p in dense.parameters()} == {torch.float64}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x)[:, :, 0, 0], model(x), atol=1e-10, rtol=1e-10)
    # torch's default device elsewhere: conv6-8 still follow the net (a module built on
    # `meta` would run on CPU inputs without complaint, so the device is checked directly)
    with torch.device("meta"):
        dense = dense_form(model)
    assert {p.device.type for p in dense.parameters()} == {"cpu"}


def _ddp(model):
    """`model` under one-rank gloo DDP with gradient_as_bucket_view, as Ray Train wraps it."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)


def test_compiled_ddp_checkpoint_keys_come_back_to_the_nets_own_names(tmp_path):
    """recipe.compile with several workers wraps the net as compile(DDP(net)): its keys are
    `_orig_mod.module.*`. Saving and every loader (resume, init_from layers: all,
    evaluation) must see the plain names, also in checkpoints saved before the fix."""
    from pipeline.models import load_state, plain_names

    model = build_model("A", num_classes=10, width_mult=0.0625, input_size=64)
    wrapped = torch.compile(_ddp(model))
    assert next(iter(wrapped.state_dict())).startswith("_orig_mod.module.")
    assert list(plain_names(wrapped.state_dict())) == list(model.state_dict())
    assert list(plain_names({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()})) == \
        list(model.state_dict())
    path = tmp_path / "state.pt"
    torch.save({"model": wrapped.state_dict()}, path)  # what the save wrote before the fix
    fresh = build_model("A", num_classes=10, width_mult=0.0625, input_size=64)
    fresh.load_state_dict(load_state(path))  # strict: every name matches
    assert torch.equal(fresh.classifier.fc8.weight, model.classifier.fc8.weight)
    b = build_model("B", num_classes=10, width_mult=0.0625, input_size=64)
    init_from(b, path)
    assert torch.equal(b.features.conv1_1.weight, model.features.conv1_1.weight)


def test_evaluation_loads_a_compiled_ddp_checkpoint(tmp_path):
    from pipeline.evaluate import load_stage_model
    from pipeline.stages import Recipe, Resources, Stage

    model = build_model("A", num_classes=6, width_mult=0.125, input_size=32)
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": torch.compile(_ddp(model)).state_dict(), "num_classes": 6},
               tmp_path / "ckpt" / "state.pt")
    stage = Stage("A", "A", 36, Recipe(crop=32, width_mult=0.125), Resources())
    loaded = load_stage_model(stage, str(tmp_path / "ckpt"))
    assert torch.equal(loaded.features.conv1_1.weight, model.features.conv1_1.weight)
