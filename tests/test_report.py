"""The paper's tables beside ours: rows we lack say so, ours with no paper row are
listed, nothing is filled in; ensembles by averaging and by greedy selection."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ensemble import average, greedy
from pipeline.protocols import Posteriors
from pipeline.report import StageRow, markdown_to_html, render


def test_report_with_every_row_missing():
    md = render("empty", [], [])
    assert md.count("| not trained |") == 12 + 10 + 6  # Tables 3, 4 and 5 rows of the paper
    assert "| A | 256 | 29.6 / 10.4 | not trained |" in md
    assert "no ensemble runs yet" in md
    assert "24.7 / 7.5" in md  # the ILSVRC submission row is the paper's, shown as such


def test_report_puts_our_numbers_beside_the_papers():
    d = StageRow("D_jit", "D", "[256,512]", "r1", {
        "single_Q384/top1_error": 26.0, "single_Q384/top5_error": 8.4,
        "dense_Q256/top1_error": 27.5, "dense_Q256/top5_error": 9.5,  # Table 3's Q for [256,512] is 384
        "dense_Q384/top1_error": 25.4, "dense_Q384/top5_error": 8.0,
        "dense_Q256-384-512/top1_error": 25.1, "dense_Q256-384-512/top5_error": 7.9,
        "multicrop_Q256-384-512/top1_error": 24.9, "multicrop_Q256-384-512/top5_error": 7.7})
    d.recipe = "paper; global batch 256, lr 0.01 at batch 256, no warmup"
    tiny = StageRow("A", "A", "72", "r2", {"single_Q72/top1_error": 3.0, "single_Q72/top5_error": 0.0},
                    "demo; global batch 32")
    md = render("exp", [d, tiny], [{"name": "ens", "member_stages": "D_jit,E_jit", "protocol": "dense_Q256-384-512",
                                    "top1": 24.2, "top5": 7.2},
                                   {"name": "ens1", "member_stages": "D_jit,E_jit", "protocol": "single_Q384",
                                    "top1": 25.0, "top5": 7.5}])
    # Table 3 is dense at the single scale Q (Section 3.2), never our centre crop
    assert "| D | [256,512] | 25.6 / 8.1 | 25.40 / 8.00 (dense_Q384) [R1] |" in md
    assert "| D | [256,512] | 24.8 / 7.5 | 25.10 / 7.90 (dense_Q256-384-512) [R1] |" in md
    assert "| D | [256,512] | multicrop | 24.6 / 7.5 | 24.90 / 7.70 (multicrop_Q256-384-512) [R1] |" in md
    assert "| D | [256,512] | dense+multicrop | 24.4 / 7.2 | not evaluated |" in md
    # a net with only a centre-crop number has none in the paper's tables ...
    table3 = md.split("## Table 3")[1].split("## Table 4")[0]
    assert "| A (stage A) | 72 | - | not evaluated |" in table3 and "single" not in table3.split("|---|")[1]
    # ... the centre crop sits in its own section, labelled as ours, with no paper column
    ours_only = md.split("## Ours only")[1]
    assert "| A (stage A) | 72 | 3.00 / 0.00 (single_Q72) [R2] |" in ours_only
    assert "| D (stage D_jit) | [256,512] | 26.00 / 8.40 (single_Q384) [R1] |" in ours_only
    assert md.index("## Ours only") > md.index("## Table 6") and md.count("(single_Q") == 3
    assert "ens1" in ours_only and "ens1" not in md.split("## Ours only")[0]
    # every table names its protocol
    for table in ("Table 3", "Table 4", "Table 5", "Table 6", "Ours only"):
        assert "Protocol: " in md.split(f"## {table}")[1].split("|")[0], table
    assert "Protocol: dense evaluation at the single scale Q, the flipped image" in md
    # every number of ours names its recipe; an ensemble's are its members'
    assert "| ens (D_jit,E_jit) | - | 24.20 / 7.20 (dense_Q256-384-512) [R1] |" in md
    assert "| R1 | paper; global batch 256, lr 0.01 at batch 256, no warmup |" in md
    assert "| R2 | demo; global batch 32 |" in md
    page = markdown_to_html(md, "exp")
    assert page.count("<table>") == 6 and "<td>25.40 / 8.00 (dense_Q384) [R1]</td>" in page


def _post(probs, labels=(0, 1, 2, 0)):
    return Posteriors(["k0", "k1", "k2", "k3"], np.array(labels), np.asarray(probs, dtype=np.float32))


def test_ensemble_of_identical_members_is_the_member():
    p = _post(np.random.default_rng(0).dirichlet(np.ones(3), size=4))
    choice = average({"a": p, "b": p, "c": p})
    np.testing.assert_allclose(choice.posteriors.probs, p.probs, rtol=1e-6)
    assert choice.errors == p.errors()


def test_greedy_adds_members_only_while_top1_error_falls():
    eye = np.eye(3)
    right = _post([eye[0], eye[1], eye[0] * 0.4 + eye[2] * 0.6, eye[0] * 0.45 + eye[2] * 0.55])  # wrong on k3
    fixes = _post([eye[0] * 0.6 + eye[1] * 0.4, eye[1], eye[0] * 0.55 + eye[2] * 0.45, eye[0]])  # wrong on k2
    bad = _post([eye[1], eye[2], eye[0], eye[1]])  # wrong everywhere
    choice = greedy({"bad": bad, "right": right, "fixes": fixes}, max_members=3)
    assert choice.run_ids == ["right", "fixes"]  # bad would raise the error: never added
    assert choice.errors["top1_error"] == 0.0
    assert [round(e, 1) for _, e in choice.trail] == [25.0, 0.0]
    assert greedy({"bad": bad, "right": right}, max_members=1).run_ids == ["right"]


def test_members_evaluated_on_different_images_are_refused():
    a = _post(np.eye(3)[[0, 1, 2, 0]])
    b = Posteriors(["k0", "k1", "k2", "other"], np.array([0, 1, 2, 0]), a.probs)
    with pytest.raises(ValueError, match="validation sets differ"):
        average({"a": a, "b": b})
