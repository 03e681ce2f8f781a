"""`python -m pipeline <verb>`: demo, train, evaluate, ensemble, report, bench, models, prune.

Plans are validated (keys, types, the stage graph) before Ray or MLflow is
touched: a typo in a plan costs a second, not a cluster start.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.preflight import PreflightFailed
from pipeline.control import PlanInterrupted

REPO = Path(__file__).resolve().parent.parent


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a plan value, e.g. --set recipe.optim.lr=0.02, --set stages.A.recipe.epochs=3 "
                        "(optim.lr=... is shorthand for every stage's recipe); repeatable")


def cmd_train(a) -> int:
    from pipeline.booking import results_table
    from pipeline.runner import PlanFailed, run_plan
    from pipeline.stages import load_plan
    from pipeline.tracking import tracking_uri, ui_command

    plan = load_plan(a.plan, a.overrides)  # raises ConfigError before any cluster work
    if a.dry_run:
        from pipeline.schedule import IMAGENET_TRAIN, describe, measured_throughput

        throughput, source = _throughput(a.throughput), "--throughput"
        if not throughput and a.gpus:
            found = measured_throughput(REPO / "bench" / "results")
            throughput, source = found if found else ({}, "")
        images = a.train_images or _train_images(plan) or IMAGENET_TRAIN
        try:
            print(describe(plan, a.gpus, throughput, source, images))
        except ValueError as exc:
            print(f"dry run: {exc}", file=sys.stderr)
            return 2
        return 0
    uri = tracking_uri()
    try:
        results = run_plan(plan, run_name=a.run_name, tracking_uri=uri, ray_address=a.address,
                           max_concurrent=a.max_concurrent_stages)
    except PlanFailed as exc:
        return _report_failure(exc, uri, plan.experiment)
    print(results_table(results))
    print(f"\nMLflow UI: {ui_command(uri, plan.experiment)}")
    return 0


def _throughput(pairs: list[str]) -> dict[str, float]:
    from pipeline.archs import get_arch

    out = {}
    for pair in pairs or []:
        arch, _, rate = pair.partition("=")
        try:
            out[get_arch(arch).name] = float(rate)
        except (KeyError, ValueError):
            raise ConfigError(f"--throughput {pair!r}: expected ARCH=IMAGES_PER_SEC_PER_GPU, e.g. D=1200") from None
    return out


def _train_images(plan) -> int | None:
    """The plan's training-set size, when its shards are on this machine."""
    try:
        from pipeline.dataset import DatasetInfo

        return DatasetInfo.load(plan.data.root).counts[plan.data.train_split]
    except (OSError, KeyError, ValueError):
        return None


def _report_failure(exc, uri: str, experiment: str | None = None) -> int:
    """A failed plan never looks like a result: the table says FAILED, the reason goes
    to stderr, and the exit status is 1."""
    from pipeline.booking import results_table
    from pipeline.tracking import ui_command

    print(results_table(exc.results))
    print(f"\n{exc}", file=sys.stderr)
    print(f"\nMLflow UI: {ui_command(uri, experiment)}")
    return 1


def cmd_demo(a) -> int:
    from data_prep.synth import make_dataset
    from pipeline.booking import results_table
    from pipeline.runner import PlanFailed, default_run_name, run_plan
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
    uri = tracking_uri()
    try:
        results = run_plan(plan, run_name=a.run_name or default_run_name(plan, fresh=True), tracking_uri=uri)
    except PlanFailed as exc:
        return _report_failure(exc, uri, plan.experiment)
    print("\n== results (validation set of the built-in dataset, single-scale centre crop)")
    print(results_table(results))
    print("\n== the paper's test protocols: dense and multi-crop over three scales, 2 Ray tasks each", flush=True)
    run_ids = [r.run_id for r in results]
    evaluate_protocols(uri, run_ids, ["dense", "multicrop", "dense+multicrop"], None, workers=2)
    print("\n== an ensemble of the demo's nets, from their stored posteriors", flush=True)
    from pipeline.ensemble import run_ensemble

    ens = run_ensemble(run_ids, tracking_uri=uri, experiment=None, protocol="dense+multicrop", scales=None,
                       say=lambda message: print(f"ensemble: {message}", flush=True))
    print(f"{ens['name']}: {ens['metric_prefix']}: top-1 error {ens['top1_error']:.2f}%, "
          f"top-5 error {ens['top5_error']:.2f}%")
    print("\n== report", flush=True)
    from pipeline.report import make_report

    md, out = make_report(uri, plan.experiment, work / "report")
    print(md)
    print(f"report files: {out}/")
    print(f"\nMLflow UI: {ui_command(uri, plan.experiment)}")
    return 0


def _stage_run_id(client, experiment: str | None, run_id: str | None, stage: str | None) -> str:
    if run_id:
        return run_id
    from pipeline.tracking import finished_stage_run

    if not (experiment and stage):
        raise SystemExit("give --run-id, or --experiment and --stage")
    try:
        return finished_stage_run(client, experiment, stage).info.run_id
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def evaluate_protocols(uri: str, run_ids: list[str], protocols: list[str], scales: list[int] | None, workers: int,
                       batch_size: int = 32, data_root: str | None = None, split: str = "val",
                       address: str | None = None) -> list[dict]:
    from pipeline.evaluate import evaluate_run_protocols

    results = []
    for run_id in run_ids:
        for r in evaluate_run_protocols(run_id, protocols, tracking_uri=uri, scales=scales, workers=workers,
                                        batch_size=batch_size, data_root=data_root, split=split,
                                        ray_address=address):
            print(f"{r['stage']}: {r['metric_prefix']}: top-1 error {r['top1_error']:.2f}%, top-5 error "
                  f"{r['top5_error']:.2f}% over {r['images']} images (run {run_id})", flush=True)
            for q, e in r["per_scale"].items():
                print(f"{r['stage']}:   of which Q={q} alone: top-1 error {e['top1_error']:.2f}%, top-5 error "
                      f"{e['top5_error']:.2f}%", flush=True)
            results.append(r)
    return results


def cmd_evaluate(a) -> int:
    from pipeline.tracking import _client, tracking_uri

    uri = tracking_uri()
    run_id = _stage_run_id(_client(uri), a.experiment, a.run_id, a.stage)
    scales = a.scales or ([a.scale] if a.scale else None)
    evaluate_protocols(uri, [run_id], a.protocol, scales, a.workers, a.batch_size, a.data_root, a.split, a.address)
    return 0


def cmd_ensemble(a) -> int:
    from pipeline.ensemble import run_ensemble
    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    try:
        r = run_ensemble(a.members, tracking_uri=uri, experiment=a.experiment, protocol=a.protocol, scales=a.scales,
                         greedy_max=a.greedy, name=a.name, register=not a.no_register,
                         say=lambda message: print(f"ensemble: {message}", flush=True))
    except ValueError as exc:  # members that do not resolve or were not evaluated: the message says which
        print(f"ensemble: {exc}", file=sys.stderr)
        return 1
    print(f"{r['name']}: members {', '.join(r['member_stages'])}; {r['metric_prefix']}: top-1 error "
          f"{r['top1_error']:.2f}%, top-5 error {r['top5_error']:.2f}% over {r['images']} images (run {r['run_id']}"
          f"{', made before: the same members, protocol and selection' if r['found'] else ''})")
    return 0


def cmd_report(a) -> int:
    from pipeline.report import make_report
    from pipeline.tracking import _client, tracking_uri

    uri = tracking_uri()
    if _client(uri).get_experiment_by_name(a.experiment) is None:
        print(f"experiment {a.experiment}: not found in {uri}", file=sys.stderr)
        return 1
    md, out = make_report(uri, a.experiment, a.out or REPO / "data" / "reports" / a.experiment,
                          log=not a.no_log)
    print(md)
    print(f"written to {out}/ (report.md, report.html, curves-*.png)" + ("" if a.no_log else "; logged to MLflow"))
    return 0


def cmd_models(a) -> int:
    from pipeline.models import summary_rows

    rows = summary_rows(a.configs or None)
    print(f"{'config':8} {'weight layers':>13} {'parameters':>13} {'GMACs@224':>10}  source")
    for r in rows:
        print(f"{r['config']:8} {r['weight_layers']:>13} {r['parameters']:>13,} {r['gmacs']:>10.2f}  {r['source']}")
    return 0


def cmd_prune(a) -> int:
    from pipeline.prune import prune
    from pipeline.tracking import TrackingUnreachable, tracking_uri

    if bool(a.plan) == bool(a.storage):
        raise ConfigError("prune: give the storage path, as --plan FILE (its `storage`) or --storage PATH")
    if a.plan:
        from pipeline.stages import load_plan

        storage = load_plan(a.plan, a.overrides).storage
    else:
        storage = a.storage
    uri = tracking_uri()
    try:
        prune(storage, a.keep_last, uri, yes=a.yes)
    except TrackingUnreachable as exc:
        print(f"prune: the tracking store did not answer, so nothing was removed: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return 0


def cmd_bench(a) -> int:
    from pipeline import bench

    return bench.main(a)


class _Protocols:
    """The evaluation protocols' names, read from pipeline.protocols (which imports torch)
    only when argparse checks or lists them: `train` must not pay torch's import to parse
    its arguments (its preflight answers in a few seconds)."""

    def __iter__(self):
        from pipeline.protocols import PROTOCOLS

        return iter(PROTOCOLS)

    def __contains__(self, name) -> bool:
        return name in tuple(self)


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
    t.add_argument("--dry-run", action="store_true",
                   help="validate the plan and print its schedule as waves (with --gpus: estimated times), then stop")
    t.add_argument("--max-concurrent-stages", type=int, metavar="N",
                   help="train at most N stages at once (default: every stage whose source has finished; "
                        "those that do not fit the cluster wait for Ray to place them)")
    t.add_argument("--gpus", type=int, help="with --dry-run: estimate each stage's time and the plan's wall time, in "
                                            "parallel and one stage at a time, on a cluster of this many GPUs")
    t.add_argument("--throughput", action="append", metavar="ARCH=IMG_S",
                   help="with --gpus: training images/s per GPU of an arch (default: bench/results/gpu-*.json; "
                        "archs not given are scaled by GMACs); repeatable")
    t.add_argument("--train-images", type=int, help="with --gpus: training-set size (default: the plan's shards, "
                                                    "else ImageNet's 1,281,167)")
    _add_set(t)
    t.set_defaults(func=cmd_train)

    PROTOCOLS = _Protocols()

    e = sub.add_parser("evaluate", help="evaluate a finished stage under the paper's test protocols")
    e.add_argument("--run-id", help="MLflow run id of a stage")
    e.add_argument("--experiment", help="with --stage: that stage's latest finished run")
    e.add_argument("--stage", help="stage name, e.g. D-384")
    e.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=["dense"], metavar="PROTOCOL",
                   help="dense (default, the paper's Section 3.2): whole image, FC as conv, + flip; multicrop: "
                        "5x5 grid + flips; dense+multicrop: both averaged; single: Q, one centre crop (ours, "
                        "not a protocol of the paper's tables); several allowed")
    e.add_argument("--scales", type=int, nargs="+", metavar="Q",
                   help="test scales, posteriors averaged (default: single: the stage's Q; others: {S-32, S, S+32} "
                        "for fixed S, {256, 384, 512} for S in [256, 512], each scale also logged alone)")
    e.add_argument("--scale", type=int, help="one test scale Q (same as --scales Q)")
    e.add_argument("--workers", type=int, default=1, help="Ray tasks the validation set is split over")
    e.add_argument("--address", help="Ray cluster address for --workers > 1 (default: RAY_ADDRESS or local)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--data-root", help="shards root (default: the run's data.root)")
    e.add_argument("--split", default="val")
    e.set_defaults(func=cmd_evaluate)

    en = sub.add_parser("ensemble", help="average stored posteriors of finished, evaluated stages (no re-run)")
    en.add_argument("members", nargs="+", help="stage run ids, or stage names with --experiment")
    en.add_argument("--experiment", help="resolve stage names in this experiment")
    en.add_argument("--protocol", choices=PROTOCOLS, default="dense+multicrop", metavar="PROTOCOL",
                    help="the protocol whose stored posteriors are averaged (as evaluate's --protocol)")
    en.add_argument("--scales", type=int, nargs="+", metavar="Q", help="the evaluated scales (default: as evaluate)")
    en.add_argument("--greedy", type=int, metavar="N", help="pick at most N members greedily by top-1 error")
    en.add_argument("--name", help="ensemble run name")
    en.add_argument("--no-register", action="store_true", help="do not log and register the ensemble model")
    en.set_defaults(func=cmd_ensemble)

    r = sub.add_parser("report", help="the paper's Tables 3-6 beside ours (Markdown, HTML, curves; logged to MLflow)")
    r.add_argument("--experiment", required=True)
    r.add_argument("--out", help="output folder (default: data/reports/<experiment>)")
    r.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="benchmarks: `bench loader` (DALI vs webdataset+PIL), `bench train` "
                                     "(net images/s, data wait), `bench eval` (channels last vs NCHW), `bench shard` (shard.py vs tar), "
                                     "`bench gpu` (the one-command GPU check)")
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

    be = bsub.add_parser("eval", help="evaluation forward passes images/s: channels last (as the protocols run) vs "
                                      "NCHW, same run, outputs compared")
    be.add_argument("--arch", required=True, help="config or alias, e.g. D or vgg16")
    be.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    be.add_argument("--batch-size", type=int, default=256, help="crops a forward pass (a multi-crop pass: 50 an image)")
    be.add_argument("--seconds", type=float, default=10.0, help="timed seconds per memory order")
    be.add_argument("--width-mult", type=float, default=1.0, help="channel scale (reduced nets for CPU)")
    be.add_argument("--crop", type=int, default=224)
    be.add_argument("--out", help="also write the JSON here, e.g. bench/results/eval-cpu.json")
    be.set_defaults(func=cmd_bench)

    bs = bsub.add_parser("shard", help="data_prep/shard.py images/s per worker (default repack, decode checks, "
                                       "resize) against `tar` of the same bytes")
    bs.add_argument("--images", type=int, default=400, help="ImageNet-like JPEGs made per kind (typical, large)")
    bs.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each figure is their median")
    bs.add_argument("--out", help="also write the JSON here, e.g. bench/results/shard-cpu.json")
    bs.set_defaults(func=cmd_bench)

    bg = bsub.add_parser("gpu", help="the whole GPU check in one command: DALI GPU vs CPU, loaders, VGG-16 training "
                                     "and evaluation throughput (no Ray, no MLflow)")
    bg.add_argument("--shards", help="glob of a train split's tars (default: make ImageNet-like JPEGs here)")
    bg.add_argument("--seconds", type=float, help="timed seconds per measurement (default: 10 on cuda, 1 on cpu)")
    bg.add_argument("--out", help="write the JSON here too, e.g. bench/results/gpu-h100.json")
    bg.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the same code at tiny sizes, the GPU graphs replaced by the CPU ones")
    bg.add_argument("--workdir", help="where the made images and shards go (default: the system temp dir)")
    bg.add_argument("--budget", type=float, help="wall seconds for the whole check: correctness first, then the "
                                                 "timed sections trimmed (fewer batch sizes / scales, shorter "
                                                 "timings) to fit; the JSON is written after every section")
    bg.set_defaults(func=cmd_bench)

    pr = sub.add_parser("prune", help="remove old plan runs' and attempts' checkpoints (a dry run unless --yes); "
                                      "never a registered version's or a running plan run's")
    pr.add_argument("--keep-last", type=int, required=True, metavar="N",
                    help="keep every checkpoint of the N most recent plan runs (their latest attempts)")
    pr.add_argument("--plan", help="the plan whose `storage` to prune (with --set overrides)")
    pr.add_argument("--storage", help="the storage path (or s3://...) to prune, instead of --plan")
    _add_set(pr)
    pr.add_argument("--yes", action="store_true", help="delete; without it, only say what would be removed")
    pr.set_defaults(func=cmd_prune)

    m = sub.add_parser("models", help="table of the model zoo: weight layers, parameters, GMACs")
    m.add_argument("configs", nargs="*", help="configs or aliases (default: all)")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "python -m pipeline " + " ".join(sys.argv[1:] if argv is None else argv)  # for benchmark records
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except PlanInterrupted as exc:  # Ctrl-C or SIGTERM: stages aborted, runs marked KILLED
        print(f"\n{exc}", file=sys.stderr)
        return 128 + exc.signal
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's abort was under way
        print("\ninterrupted twice: stopped without waiting for the abort to finish; run the same command to "
              "resume", file=sys.stderr)
        return 130
    except PreflightFailed as exc:  # found before Ray started: one line per problem
        print(f"preflight: {len(exc.problems)} problem(s); nothing was started:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
