"""`python -m pipeline report`: the paper's Tables 3-6 with its numbers and ours side by side.

Every number of ours beside one of the paper's comes from the paper's protocol for that
table (Section 3.2): Table 3 is dense evaluation (the flipped image averaged in) at the
single scale Q = S (Q = 384 for S in [256, 512]); Table 4 dense over three scales;
Table 5 dense, multi-crop and both over three scales; Table 6 ensembles under dense or
dense+multicrop. Our single centre crop (the per-epoch validation) is not a protocol of
any of the paper's tables: it is listed on its own, labelled as ours.

Our numbers come from the experiment's MLflow runs: for each stage, its latest
finished run; for Table 6, the ensemble runs. A paper row we have not trained
says so; a net of ours with no paper counterpart (a reduced demo scale, say) is
listed under the paper's rows with "-" for the paper. Nothing is filled in.
Writes report.md, report.html and one training-curve PNG per stage, logs them
to a `report` run in the experiment, and returns the Markdown.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

J = "[256,512]"  # our label for the jittered training scale
# (arch, train S) -> (top-1, top-5) error %, ILSVRC-2012 validation (PAPER.md).
TABLE3 = {("A", "256"): (29.6, 10.4), ("A-LRN", "256"): (29.7, 10.5), ("B", "256"): (28.7, 9.9),
          ("C", "256"): (28.1, 9.4), ("C", "384"): (28.1, 9.3), ("C", J): (27.3, 8.8),
          ("D", "256"): (27.0, 8.8), ("D", "384"): (26.8, 8.7), ("D", J): (25.6, 8.1),
          ("E", "256"): (27.3, 9.0), ("E", "384"): (26.9, 8.7), ("E", J): (25.5, 8.0)}
TABLE4 = {("B", "256"): (28.2, 9.6), ("C", "256"): (27.7, 9.2), ("C", "384"): (27.8, 9.2), ("C", J): (26.3, 8.2),
          ("D", "256"): (26.6, 8.6), ("D", "384"): (26.5, 8.6), ("D", J): (24.8, 7.5),
          ("E", "256"): (26.9, 8.7), ("E", "384"): (26.7, 8.6), ("E", J): (24.8, 7.5)}
TABLE5 = {("D", J, "dense"): (24.8, 7.5), ("D", J, "multicrop"): (24.6, 7.5), ("D", J, "dense+multicrop"): (24.4, 7.2),
          ("E", J, "dense"): (24.8, 7.5), ("E", J, "multicrop"): (24.6, 7.4), ("E", J, "dense+multicrop"): (24.4, 7.1)}
TABLE6 = {"ILSVRC-2014 submission (7 nets)": (24.7, 7.5), "D, E (multi-scale) dense": (24.0, 7.1),
          "D, E (multi-scale) multi-crop & dense": (23.7, 6.8)}


@dataclass
class StageRow:
    stage: str
    arch: str
    train_scale: str
    run_id: str
    metrics: dict = field(default_factory=dict)
    recipe: str = ""  # which recipe produced these numbers (the stage run's `recipe` tag)

    def protocol(self, name: str, multi: bool) -> tuple[str, float, float] | None:
        """(metric prefix, top-1, top-5) of the last-logged `name` result (single or several Q)."""
        pat = re.compile(rf"^{re.escape(name.replace('+', '_'))}_Q(\d+(?:-\d+)*)/top1_error$")
        found = [(k, m.group(1)) for k in self.metrics if (m := pat.match(k))]
        found = [(k, qs) for k, qs in found if ("-" in qs) == multi]
        if not found:
            return None
        key, _ = sorted(found)[-1]
        prefix = key.rsplit("/", 1)[0]
        return prefix, self.metrics[key], self.metrics.get(f"{prefix}/top5_error", float("nan"))

    def dense_at(self, q: int) -> tuple[str, float, float] | None:
        """(metric prefix, top-1, top-5) of dense evaluation at the single scale `q`."""
        prefix = f"dense_Q{q}"
        if f"{prefix}/top1_error" not in self.metrics:
            return None
        return prefix, self.metrics[f"{prefix}/top1_error"], self.metrics.get(f"{prefix}/top5_error", float("nan"))

    @property
    def table3_scale(self) -> int | None:
        """Table 3's test scale: Q = S for a fixed S, Q = (Smin + Smax) / 2 for a jittered one."""
        found = [int(x) for x in re.findall(r"\d+", self.train_scale)]
        if len(found) == 1:
            return found[0]
        return (found[0] + found[1]) // 2 if len(found) == 2 else None


def _fmt(pair) -> str:
    return "-" if pair is None else f"{pair[0]:.1f} / {pair[1]:.1f}"


class Recipes:
    """Short keys (R1, R2, ...) for the recipes behind our numbers, listed under the tables,
    so every number says which recipe produced it without repeating a long line per cell."""

    def __init__(self):
        self.keys: dict[str, str] = {}

    def key(self, recipe: str) -> str:
        recipe = recipe or "not recorded (a run from before recipes were tagged)"
        return self.keys.setdefault(recipe, f"R{len(self.keys) + 1}")

    def lines(self) -> list[str]:
        if not self.keys:
            return []
        return ["## Recipes", "", *_table(["key", "recipe"], [[k, r] for r, k in self.keys.items()])]


def _ours(found, row: StageRow | None = None, recipes: Recipes | None = None) -> str:
    if found is None:
        return "not evaluated"
    mark = f" [{recipes.key(row.recipe)}]" if recipes is not None and row is not None else ""
    return f"{found[1]:.2f} / {found[2]:.2f} ({found[0]}){mark}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _stage_table(paper: dict, ours: list[StageRow], result, recipes: Recipes) -> list[str]:
    """`result(row)`: the (prefix, top-1, top-5) of ours under the table's protocol, or None."""
    rows = []
    keyed = {(r.arch, r.train_scale): r for r in ours}
    for (arch, s), numbers in paper.items():
        r = keyed.get((arch, s))
        rows.append([arch, s, _fmt(numbers), "not trained" if r is None else _ours(result(r), r, recipes)])
    for r in ours:
        if (r.arch, r.train_scale) not in paper:
            rows.append([f"{r.arch} (stage {r.stage})", r.train_scale, "-", _ours(result(r), r, recipes)])
    return _table(["net", "train S", "paper top-1 / top-5 %", "ours top-1 / top-5 % (protocol)"], rows)


def _table3(r: StageRow):
    q = r.table3_scale
    return None if q is None else r.dense_at(q)


SINGLE_CROP = "single (ours)"  # one centre crop at Q: our per-epoch validation, no table of the paper's


def render(experiment: str, stages: list[StageRow], ensembles: list[dict]) -> str:
    recipes = Recipes()
    out = [f"# {experiment}: our errors beside Simonyan & Zisserman's", "",
           "ILSVRC-2012 validation errors for the paper; ours are on this experiment's validation split. "
           "\"not trained\" and \"not evaluated\" rows are missing results, never estimates. "
           "Every number of ours beside one of the paper's was measured with that table's protocol "
           "(Section 3.2), named in brackets after it. "
           "[R1], [R2], ... name the recipe that produced each of our numbers (listed at the end).", "",
           "## Table 3: single test scale (Q = S, or 384 for S in [256, 512])", "",
           "Protocol: dense evaluation at the single scale Q, the flipped image's softmax averaged in "
           "(metric dense_Q<Q>).", "",
           *_stage_table(TABLE3, stages, _table3, recipes), "",
           "## Table 4: multiple test scales, dense evaluation", "",
           "Protocol: dense evaluation with flips, softmax averaged over Q in {S-32, S, S+32} for a fixed S, "
           "{256, 384, 512} for S in [256, 512] (metric dense_Q<Q1-Q2-Q3>).", "",
           *_stage_table(TABLE4, stages, lambda r: r.protocol("dense", True), recipes), "",
           "## Table 5: dense, multi-crop, and both (multiple test scales)", "",
           "Protocol: as the row says, over the three scales of Table 4; multi-crop is a 5x5 grid of crops "
           "and their flips per scale.", ""]
    rows = []
    keyed = {(r.arch, r.train_scale): r for r in stages}
    for (arch, s, proto), numbers in TABLE5.items():
        r = keyed.get((arch, s))
        rows.append([arch, s, proto, _fmt(numbers),
                     "not trained" if r is None else _ours(r.protocol(proto, True), r, recipes)])
    for r in stages:
        if (r.arch, r.train_scale, "dense") not in TABLE5:
            for proto in ("dense", "multicrop", "dense+multicrop"):
                if r.protocol(proto, True):
                    rows.append([f"{r.arch} (stage {r.stage})", r.train_scale, proto, "-",
                                 _ours(r.protocol(proto, True), r, recipes)])
    out += _table(["net", "train S", "protocol", "paper top-1 / top-5 %", "ours top-1 / top-5 %"], rows)
    out += ["", "## Table 6: ensembles", "",
            "Protocol: the members' softmax posteriors averaged, each member under the protocol named "
            "after the number (the paper's rows: dense, and multi-crop & dense, over three scales).", ""]
    rows = [[name, _fmt(numbers), "-"] for name, numbers in TABLE6.items()]
    by_stage = {r.stage: r for r in stages}

    def members(e: dict) -> str:  # an ensemble's recipes are its members'
        keys = {recipes.key(by_stage[m].recipe) for m in e["member_stages"].split(",") if m in by_stage}
        return f" [{', '.join(sorted(keys))}]" if keys else " [members' recipes not in this report]"

    paper_protocol = [e for e in ensembles if not e["protocol"].startswith("single_")]
    rows += [[f"{e['name']} ({e['member_stages']})", "-",
              f"{e['top1']:.2f} / {e['top5']:.2f} ({e['protocol']}){members(e)}"] for e in paper_protocol]
    if not paper_protocol:
        rows.append(["ours", "-", "no ensemble runs yet"])
    out += _table(["ensemble", "paper top-1 / top-5 %", "ours top-1 / top-5 %"], rows)
    # Ours only: a protocol none of the paper's tables uses, kept out of their columns.
    rows = [[f"{r.arch} (stage {r.stage})", r.train_scale, _ours(found, r, recipes)]
            for r in stages if (found := r.protocol("single", False))]
    rows += [[f"ensemble {e['name']} ({e['member_stages']})", "-",
              f"{e['top1']:.2f} / {e['top5']:.2f} ({e['protocol']}){members(e)}"]
             for e in ensembles if e["protocol"].startswith("single_")]
    if rows:
        out += ["", f"## Ours only: {SINGLE_CROP}, not comparable with the paper's tables", "",
                "Protocol: the image rescaled to Q, one centre crop, no flip (the per-epoch validation of "
                "our training runs). None of the paper's tables uses it, so it has no paper column.", "",
                *_table(["net", "train S", "ours top-1 / top-5 % (protocol)"], rows)]
    recipe_lines = recipes.lines()
    out += ["", *recipe_lines] if recipe_lines else []
    return "\n".join(out) + "\n"


def markdown_to_html(md: str, title: str) -> str:
    body, table = [], []

    def flush():
        if table:
            head, *rows = table
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                        + "</tr></thead><tbody>" + "".join(
                            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</tbody></table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def plot_curves(client, stage: StageRow, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, names in ((a1, ["train_loss", "val_loss"]), (a2, ["val_top1_error", "val_top5_error"])):
        for name in names:
            hist = sorted(client.get_metric_history(stage.run_id, name), key=lambda m: m.step)
            if hist:
                ax.plot([m.step + 1 for m in hist], [m.value for m in hist], marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.legend()
    a1.set_title(f"{stage.stage} ({stage.arch}, S={stage.train_scale}): loss")
    a2.set_title("validation error %")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def collect(client, experiment_id: str) -> tuple[list[StageRow], list[dict]]:
    runs = client.search_runs([experiment_id], "tags.kind = 'stage' and tags.stage_status = 'finished'",
                              order_by=["attributes.start_time DESC"])
    latest: dict[str, StageRow] = {}
    for r in runs:
        t = r.data.tags
        latest.setdefault(t["stage"], StageRow(t["stage"], t.get("arch", "?"), t.get("train_scale", "?"),
                                               r.info.run_id, dict(r.data.metrics), t.get("recipe", "")))
    ensembles = {}  # one row per ensemble (members and protocol): the latest run of it
    for r in client.search_runs([experiment_id], "tags.kind = 'ensemble' and attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time ASC"]):
        prefix = r.data.tags.get("protocol", "")
        m = r.data.metrics
        if f"{prefix}/top1_error" in m:
            ensembles[(r.data.tags.get("members"), prefix)] = {
                "name": r.info.run_name, "member_stages": r.data.tags.get("member_stages", ""), "protocol": prefix,
                "top1": m[f"{prefix}/top1_error"], "top5": m.get(f"{prefix}/top5_error", float("nan"))}
    return sorted(latest.values(), key=lambda s: s.stage), list(ensembles.values())


def make_report(tracking_uri: str, experiment: str, out_dir: str | Path, log: bool = True) -> tuple[str, Path]:
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment)
    stages, ensembles = collect(tracker.client, tracker.experiment_id)
    md = render(experiment, stages, ensembles)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(markdown_to_html(md, f"{experiment} report"))
    for s in stages:
        plot_curves(tracker.client, s, out / f"curves-{s.stage}.png")
    if log:
        run = tracker.client.create_run(tracker.experiment_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                                        tags={"kind": "report"})
        tracker.client.log_artifacts(run.info.run_id, str(out), "report")
        tracker.client.set_terminated(run.info.run_id, "FINISHED")
    return md, out
