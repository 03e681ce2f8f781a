"""`python -m pipeline <verb>`: demo, train, evaluate, report, bench, models.

Plans are validated (keys, types, the stage graph) before Ray or MLflow is
touched: a typo in a plan costs a second, not a cluster start.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a plan value, e.g. --set recipe.optim.lr=0.02, --set stages.A.recipe.epochs=3 "
                        "(optim.lr=... is shorthand for every stage's recipe); repeatable")


def cmd_train(a) -> int:
    from pipeline.runner import results_table, run_plan
    from pipeline.stages import load_plan
    from pipeline.tracking import tracking_uri, ui_command

    plan = load_plan(a.plan, a.overrides)  # raises ConfigError before any cluster work
    if a.dry_run:
        for st in plan.order():
            src = f" <- {st.init_from.stage}" if st.init_from else ""
            print(f"{st.name}: {st.arch} S={st.scale_label}{src}, {st.recipe.epochs} epochs, "
                  f"batch {st.recipe.batch_size}, lr {st.recipe.optim.lr}, {st.resources.num_workers} workers")
        return 0
    uri = tracking_uri(REPO / "mlflow.db")
    results = run_plan(plan, run_name=a.run_name, tracking_uri=uri, ray_address=a.address)
    print(results_table(results))
    print(f"\nMLflow UI: {ui_command(uri)}")
    return 0


def cmd_demo(a) -> int:
    from data_prep.synth import make_dataset
    from pipeline.runner import default_run_name, results_table, run_plan
    from pipeline.stages import PLANS_DIR, load_plan
    from pipeline.tracking import tracking_uri, ui_command

    work = Path(a.workdir).resolve()
    overrides = [f"data.root={work / 'shards'}", f"storage={work / 'runs'}", *a.overrides]
    plan = load_plan(PLANS_DIR / "demo.yaml", overrides)
    src = work / "imagenet"
    if not (src / "train").is_dir():
        print(f"== making the built-in dataset in {src}", flush=True)
        make_dataset(src)
    print("== sharding it with data_prep/shard.py", flush=True)
    cmd = [sys.executable, str(REPO / "data_prep" / "shard.py"), "--src", str(src), "--out", str(work / "shards"),
           "--samples-per-shard", "64", "--workers", "2"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print("== training the reduced staged plan with Ray Train (2 CPU workers, DALI on CPU)", flush=True)
    uri = tracking_uri(REPO / "mlflow.db")
    results = run_plan(plan, run_name=a.run_name or default_run_name(plan, fresh=True), tracking_uri=uri)
    print("\n== results (validation set of the built-in dataset, single-scale centre crop)")
    print(results_table(results))
    print(f"\nMLflow UI: {ui_command(uri)}")
    return 0


def cmd_evaluate(a) -> int:
    from pipeline.evaluate import evaluate_run
    from pipeline.tracking import tracking_uri

    uri = tracking_uri(REPO / "mlflow.db")
    result = evaluate_run(a.run_id, tracking_uri=uri, scale=a.scale, batch_size=a.batch_size,
                          data_root=a.data_root, split=a.split)
    print(f"{result['metric_prefix']}: top-1 error {result['top1_error']:.2f}%, "
          f"top-5 error {result['top5_error']:.2f}% over {result['images']} images (logged to run {a.run_id})")
    return 0


def cmd_report(a) -> int:
    from pipeline.tracking import Tracker, tracking_uri

    uri = tracking_uri(REPO / "mlflow.db")
    tracker = Tracker(uri, a.experiment)
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'stage'",
                                      order_by=["attributes.start_time ASC"])
    if not runs:
        print(f"experiment {a.experiment}: no stage runs in {uri}")
        return 1
    print(f"| plan run | stage | arch | train S | status | top-1 err % | top-5 err % |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        fmt = lambda k: f"{m[k]:.2f}" if k in m else "not evaluated"  # noqa: E731
        print(f"| {t.get('plan_run')} | {t.get('stage')} | {t.get('arch')} | {t.get('train_scale')} | "
              f"{t.get('stage_status', r.info.status.lower())} | {fmt('top1_error')} | {fmt('top5_error')} |")
    return 0


def cmd_models(a) -> int:
    from pipeline.models import summary_rows

    rows = summary_rows(a.configs or None)
    print(f"{'config':8} {'weight layers':>13} {'parameters':>13} {'GMACs@224':>10}  source")
    for r in rows:
        print(f"{r['config']:8} {r['weight_layers']:>13} {r['parameters']:>13,} {r['gmacs']:>10.2f}  {r['source']}")
    return 0


def cmd_bench(a) -> int:
    from pipeline import bench

    return bench.main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser("demo", help="make the built-in dataset, shard it, train the reduced plan, report")
    d.add_argument("--workdir", default=str(REPO / "data" / "demo"), help="where images, shards and checkpoints go")
    d.add_argument("--run-name", help="plan run name (default: a new one each time)")
    _add_set(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a plan's stages on Ray Train, tracked in MLflow")
    t.add_argument("--plan", required=True, help="plan YAML, e.g. pipeline/plans/paper.yaml")
    t.add_argument("--run-name", help="plan run name; rerunning with the same name resumes it "
                                      "(default: plan name + content hash, so the same command resumes)")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    t.add_argument("--dry-run", action="store_true", help="validate the plan and print its stages, then stop")
    _add_set(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a finished stage run (single scale, centre crop)")
    e.add_argument("--run-id", required=True, help="MLflow run id of a stage")
    e.add_argument("--scale", type=int, help="test scale Q (default: the stage's)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--data-root", help="shards directory (default: the one the stage trained on)")
    e.add_argument("--split", default="val")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="table of an experiment's stage runs and their errors")
    r.add_argument("--experiment", required=True, help="MLflow experiment, e.g. vgg-demo")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="benchmarks: `bench loader` (DALI vs webdataset+PIL), `bench train` (net images/s, data wait)")
    bsub = b.add_subparsers(dest="what", required=True, metavar="WHAT")
    bl = bsub.add_parser("loader", help="training-pipeline images/s vs webdataset + PIL + DataLoader, same run")
    bl.add_argument("--shards", required=True, help="glob of one split's tars, e.g. 'shards/train/*.tar'")
    bl.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    bl.add_argument("--batch-size", type=int, default=64)
    bl.add_argument("--seconds", type=float, default=20.0, help="timed seconds per loader")
    bl.add_argument("--scale", type=int, nargs=2, default=[256, 512], metavar=("SMIN", "SMAX"))
    bl.add_argument("--crop", type=int, default=224)
    bl.add_argument("--threads", type=int, help="DALI threads and DataLoader workers (default: all cores)")
    bl.add_argument("--out", help="also write the JSON here, e.g. bench/results/loader-cpu.json")
    bl.set_defaults(func=cmd_bench)
    bt = bsub.add_parser("train", help="training images/s and data-wait share: synthetic batches vs the real loader")
    bt.add_argument("--arch", required=True, help="config or alias, e.g. D or vgg16")
    bt.add_argument("--shards", help="glob of one split's tars; adds the run fed by the real DALI loader")
    bt.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    bt.add_argument("--batch-size", type=int, default=32, help="per device")
    bt.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run")
    bt.add_argument("--width-mult", type=float, default=1.0, help="channel scale (reduced nets for CPU)")
    bt.add_argument("--crop", type=int, default=224)
    bt.add_argument("--scale", type=int, nargs=2, default=[256, 512], metavar=("SMIN", "SMAX"))
    bt.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on GPU, fp32 on CPU")
    bt.add_argument("--compile", action="store_true", help="torch.compile the net")
    bt.add_argument("--threads", type=int, help="DALI threads (default: all cores)")
    bt.add_argument("--out", help="also write the JSON here, e.g. bench/results/train-cpu.json")
    bt.set_defaults(func=cmd_bench)

    m = sub.add_parser("models", help="table of the model zoo: weight layers, parameters, GMACs")
    m.add_argument("configs", nargs="*", help="configs or aliases (default: all)")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
