"""MLflow: a parent run per plan run, a nested run per stage, metrics from rank 0.

The only module that imports MLflow. The store is `MLFLOW_TRACKING_URI` when set,
else one SQLite file per user, `$VGG_HOME/mlflow.db` (`~/.vgg` by default; the plain
./mlruns file store is refused by MLflow since 3.13): an absolute path, never one
relative to the directory a process starts in, which for a Ray job is Ray's temporary
copy of the repository. `make mlflow-server` serves the same file. A tracking server
that is down must not stop training:
`MetricsLogger` buffers what it could not send and retries later.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# MLflow 3's UI picks an experiment's view from this tag: the model-training one (runs,
# metrics, charts), not the GenAI one (traces) it otherwise opens on.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION = "mlflow.note.content"  # a run's or experiment's description in the UI


def home() -> Path:
    """Where this user's pipeline state lives unless told otherwise: `VGG_HOME`, else ~/.vgg."""
    return Path(os.environ.get("VGG_HOME") or Path.home() / ".vgg").expanduser().resolve()


def default_store() -> str:
    """The tracking store every entry point uses when MLFLOW_TRACKING_URI is not set."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_store()


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file (`mlartifacts/`), not in
    MLflow's default ./mlruns under whatever directory the process happened to start in.
    A tracking server decides its own artifact root (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def finished_stage_run(client, experiment: str, stage: str):
    """The latest finished run of `stage` in `experiment` (stage names resolve to runs
    this way for evaluate and ensemble); an error naming both when there is none."""
    exp = client.get_experiment_by_name(experiment)
    found = exp and client.search_runs([exp.experiment_id], f"tags.stage = '{stage}' and tags.kind = 'stage' and "
                                       "tags.stage_status = 'finished'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
    if found:
        return found[0]
    if not exp:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} in {client.tracking_uri}; experiments there: "
                         f"{', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'stage' and tags.stage_status = 'finished'")
    stages = sorted({r.data.tags.get("stage", "?") for r in runs})
    raise ValueError(f"experiment {experiment}: no finished run of stage {stage!r}; finished stages there: "
                     f"{', '.join(stages) or 'none'}")


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer (or answered with an error): whether there is a
    champion is unknown, so nothing may be trained or promoted."""


def champion(client, model: str, alias: str = "champion"):
    """The champion version of `model`, or None when the model or its alias does not exist.
    Only MLflow's "does not exist" answer means "no champion"; any other failure (a
    server that is down, a timeout, an error) raises TrackingUnreachable: read as "no
    champion" it would retrain on unchanged data and promote without a comparison."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model)
        version = registered.aliases.get(alias)
        return None if version is None else client.get_model_version(model, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" and "Registered Model" in str(exc):
            return None
        raise TrackingUnreachable(str(exc)) from exc


def experiment_link(base: str, experiment_id: str) -> str:
    """The experiment's page in MLflow 3's model-training view. The UI opens every page
    in its GenAI view unless the link says otherwise (the experiment's kind tag alone
    does not switch the first page; checked in headless Chromium)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_command(uri: str, experiment: str | None = None) -> str:
    """How to look at `uri` (and `experiment`, when given) in the MLflow UI."""
    exp_id = None
    if experiment:
        try:
            found = _client(uri).get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else None
        except Exception:  # noqa: BLE001 - a hint, never a failure
            exp_id = None
    if uri.startswith(("http://", "https://")):
        return f"open {experiment_link(uri, exp_id) if exp_id else uri} in a browser"
    then = f", then open {experiment_link('http://127.0.0.1:5000', exp_id)}" if exp_id else ""
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000{then}"


def _client(uri: str):
    # Bounded retries: a down server costs seconds per attempt, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def finished_stages(uri: str, experiment: str, run_name: str) -> set[str]:
    """The stages whose latest run in plan run `run_name` finished (as Tracker.stage_run
    decides it), read only: no experiment or run is made."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    latest: dict[str, object] = {}
    for r in client.search_runs([exp.experiment_id], f"tags.plan_run = '{run_name}' and tags.kind = 'stage'",
                                order_by=["attributes.start_time DESC"]):
        latest.setdefault(r.data.tags.get("stage"), r)
    return {stage for stage, r in latest.items() if _finished(r)}


def _finished(run) -> bool:
    """A stage run whose training ended and whose booking completed."""
    return run.data.tags.get("stage_status") == "finished"


@dataclass(frozen=True)
class StageRun:
    run_id: str
    finished: bool
    checkpoint: str | None  # where the finished stage's final checkpoint lives
    tags: dict = field(default_factory=dict)

    @property
    def failure_kind(self) -> str | None:
        """"stalled" or "diverged" when this attempt failed as training (not a crash)."""
        return self.tags.get("failure_kind")


class Tracker:
    """Driver-side bookkeeping: find or create the plan's runs, so a rerun of the same
    plan run continues its MLflow runs instead of duplicating them."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client = _client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (exp.experiment_id if exp else
                              self.client.create_experiment(experiment, artifact_location=artifact_root(uri),
                                                            tags={EXPERIMENT_KIND: MODEL_TRAINING}))
        if exp is not None and exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def parent_run(self, run_name: str, params: dict, tags: dict) -> tuple[str, bool]:
        """(run id, resumed?) of the plan run named `run_name`."""
        found = self._find(f"tags.plan_run = '{run_name}' and tags.kind = 'plan'")
        if found:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id, True
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags=dict(tags, plan_run=run_name, kind="plan"))
        self._log_params(run.info.run_id, params)
        return run.info.run_id, False

    def stage_run(self, parent_id: str, run_name: str, stage: str, params: dict, tags: dict,
                  new_attempt: bool = False) -> StageRun:
        """The stage's latest run in this plan run (reopened if it did not finish), or a new
        one. A failed attempt is kept as it is: `new_attempt` starts the next in a new run,
        since a changed recipe cannot be logged over the old one's params."""
        found = self._find(f"tags.plan_run = '{run_name}' and tags.stage = '{stage}' and tags.kind = 'stage'")
        if found and not new_attempt:
            finished = _finished(found)
            failed = found.data.tags.get("stage_status") == "failed"
            if not (finished or failed) and found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return StageRun(found.info.run_id, finished, found.data.tags.get("checkpoint"), dict(found.data.tags))
        attempt = int(found.data.tags.get("attempt", "1")) + 1 if found else 1
        suffix = "" if attempt == 1 else f" (attempt {attempt})"
        all_tags = dict(tags, plan_run=run_name, stage=stage, kind="stage", attempt=str(attempt),
                        **{"mlflow.parentRunId": parent_id})
        run = self.client.create_run(self.experiment_id, run_name=f"{run_name}/{stage}{suffix}", tags=all_tags)
        self._log_params(run.info.run_id, params)
        self.client.set_tag(run.info.run_id, DESCRIPTION, stage_description(all_tags))
        return StageRun(run.info.run_id, False, None, all_tags)

    def describe(self, run_id: str) -> None:
        """The run's description in the UI, from its tags (updated with the final errors
        when the stage finishes)."""
        self.client.set_tag(run_id, DESCRIPTION, stage_description(self.client.get_run(run_id).data.tags))

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, series: dict[str, list[float]] | None = None) -> None:
        """Final figures (step 0) and, in `series`, curves (value i at step i), in one call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()] + [
            Metric(k, float(v), now, step) for k, values in (series or {}).items() for step, v in enumerate(values)])

    def finish_stage(self, run_id: str, metrics: dict, checkpoint: str, model=None,
                     registered_name: str | None = None, bundle=None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        tags = self.client.get_run(run_id).data.tags
        self.client.set_tag(run_id, DESCRIPTION, stage_description(tags, metrics))
        if model is not None:
            self.log_model(run_id, model, registered_name, bundle)
        self.client.set_tag(run_id, "checkpoint", checkpoint)
        self._drop_failure(run_id, tags)
        self.client.set_tag(run_id, "stage_status", "finished")
        self.client.set_terminated(run_id, "FINISHED")

    def _drop_failure(self, run_id: str, tags: dict) -> None:
        """A run that failed and was resumed in place (a crash, a corrupt sample, a failed
        booking) finishes without its failures' tags; their reasons are kept, oldest first,
        in `earlier_failure`. Done last before the run is marked finished, so a booking that
        fails on the way leaves them as they were."""
        self._keep_failure(run_id, tags)
        for key in ("failure", "data_failure", "failure_epoch"):
            if key in tags:
                self.client.delete_tag(run_id, key)

    def _keep_failure(self, run_id: str, tags: dict) -> None:
        """The run's `failure` reason appended to its `earlier_failure` tag."""
        if "failure" in tags:
            kept = "\n".join(filter(None, (tags.get("earlier_failure"), tags["failure"])))
            self.client.set_tag(run_id, "earlier_failure", kept[-5000:])

    def fail(self, run_id: str, reason: str, tags: dict | None = None) -> None:
        """Mark a stage run FAILED with the reason (and `stage_status=failed` when given in
        `tags`, for training failures a rerun must not repeat); nothing is registered. A
        reason already there (an attempt resumed in the same run) moves to `earlier_failure`."""
        self._keep_failure(run_id, self.client.get_run(run_id).data.tags)
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, str(value)[:5000])
        self.client.set_tag(run_id, "failure", reason[:5000])
        self.client.set_terminated(run_id, "FAILED")

    def finish_parent(self, run_id: str, metrics: dict, status: str = "FINISHED", tags: dict | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, str(value)[:5000])
        self.client.set_terminated(run_id, status)

    def log_model(self, run_id: str, model, registered_name: str | None = None, bundle=None) -> None:
        """The trained net as an MLflow PyTorch model (`model`, loadable with
        mlflow.pytorch.load_model) and, given a `bundle` (nets, members, classes; see
        pipeline/serving.py), as a classifier (`classifier`, mlflow.pyfunc) that takes JPEG
        bytes or uint8 arrays and returns class ids, names and top-5 probabilities. The
        classifier, or without a bundle the net, is registered as a new version of
        `registered_name` (one registered model per arch), with the run's stage, plan
        run and recipe as version tags and a description."""
        import mlflow
        import torch

        # A booking that a dead driver left half done registered this run's version already:
        # never a second one (its tags and description are set again below).
        booked = [v.version for v in self.client.search_model_versions(f"run_id = '{run_id}'")
                  if v.name == registered_name] if registered_name else []
        if booked:
            version = booked[0]
        else:
            mlflow.set_tracking_uri(self.uri)
            side = getattr(model, "input_size", 224)
            # pt2 export traces the forward pass with this example; a batch of 1 would pin the
            # exported batch dimension to 1 (0/1 specialisation), so the example has 2.
            example = torch.zeros(2, 3, side, side).numpy()
            torch_req = f"torch=={torch.__version__.split('+')[0]}"
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(model.eval(), name="model", input_example=example,
                                                registered_model_name=None if bundle else registered_name,
                                                pip_requirements=[torch_req])
                if bundle:
                    info = self._log_classifier(bundle, registered_name, torch_req)
            version = getattr(info, "registered_model_version", None)
        if registered_name and version is not None:
            tags = self.client.get_run(run_id).data.tags
            for key in ("stage", "plan_run", "train_scale", "init_from", "recipe", "deviation"):
                if key in tags:
                    self.client.set_model_version_tag(registered_name, str(version), key, tags[key])
            self.client.update_model_version(registered_name, str(version),
                                             description=tags.get(DESCRIPTION) or stage_description(tags))

    @staticmethod
    def _log_classifier(bundle, registered_name: str | None, torch_req: str):
        import tempfile

        import mlflow.pyfunc

        from pipeline.serving import write_bundle

        with tempfile.TemporaryDirectory() as tmp, _known_harmless_mlflow_notes():
            folder = write_bundle(Path(tmp) / "bundle", *bundle)
            return mlflow.pyfunc.log_model(name="classifier", python_model=_classifier_model(),
                                           artifacts={"bundle": str(folder)},
                                           code_paths=[str(Path(__file__).resolve().parent)],
                                           registered_model_name=registered_name,
                                           pip_requirements=[torch_req, "pillow", "numpy", "pandas"])

    def stage_results(self, run_name: str) -> list[dict]:
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.plan_run = '{run_name}' and tags.kind = 'stage'",
                                       order_by=["attributes.start_time ASC"])
        return [dict(run_id=r.info.run_id, status=r.info.status, **r.data.tags, **r.data.metrics) for r in runs]


class _known_harmless_mlflow_notes:
    """MLflow logs on every registration of our classifier that "a Python object is pickled
    with CloudPickle": the object is this module's own class, shipped with `pipeline/` as
    code. Only that message is held back, only while the classifier is logged."""

    PICKLED = "Passing a Python object as `python_model` causes it to be serialized using CloudPickle"

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("mlflow.pyfunc")
        self._filter = lambda record: self.PICKLED not in record.getMessage()
        self._logger.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)
        return False


def _classifier_model():
    """An mlflow.pyfunc model over pipeline.serving's Classifier (defined here, the only
    module that imports MLflow; pickled by value, with `pipeline/` shipped as code)."""
    import mlflow.pyfunc

    class VGGClassifier(mlflow.pyfunc.PythonModel):
        # Its input is JPEG bytes, base64 or uint8 arrays, which the classifier checks itself:
        # no type-hint schema for MLflow to validate against (nor its note asking for one).
        _skip_type_hint_validation = True

        def load_context(self, context):
            from pipeline.serving import load_bundle

            self.classifier = load_bundle(context.artifacts["bundle"])

        def predict(self, context, model_input, params=None):
            import numpy as np
            import pandas as pd

            if isinstance(model_input, pd.DataFrame):
                column = "image" if "image" in model_input.columns else model_input.columns[0]
                images = list(model_input[column])
            elif isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim in (2, 3):
                images = [model_input]  # one image
            elif isinstance(model_input, (bytes, bytearray)):
                images = [model_input]
            else:
                images = list(model_input)
            return pd.DataFrame(self.classifier.predict(images))

    return VGGClassifier()


def stage_description(tags: dict, metrics: dict | None = None) -> str:
    """What a stage run is, in a line or two: arch, scale, init, final errors, recipe."""
    text = (f"VGG {tags.get('arch', '?')} trained at S={tags.get('train_scale', '?')}, initialised from "
            f"{tags.get('init_from', '?')} (stage {tags.get('stage', '?')} of plan run {tags.get('plan_run', '?')}).")
    if metrics and "top1_error" in metrics:
        text += (f" Final validation error: top-1 {metrics['top1_error']:.2f}%, top-5 {metrics['top5_error']:.2f}%"
                 f" after {int(metrics.get('epochs_trained', 0))} epochs.")
    if tags.get("recipe"):
        text += f" Recipe: {tags['recipe']}."
    return text


class MetricsLogger:
    """Per-epoch metrics from rank 0 to one run; a no-op elsewhere. Failed sends are
    kept and retried on the next call and at `flush`, with a warning, never raised."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool):
        self.enabled = bool(enabled and uri and run_id)
        self.uri, self.run_id = uri, run_id
        self.pending: list = []
        self._client = _client(uri) if self.enabled else None

    def last_step(self, metric: str) -> int | None:
        """The highest step logged for `metric` in the run (None: none, or unreachable)."""
        if not self.enabled:
            return None
        try:
            history = self._client.get_metric_history(self.run_id, metric)
        except Exception:  # noqa: BLE001 - an unreachable server must not stop training
            return None
        return max((m.step for m in history), default=None)

    def log_dataset(self, name: str, digest: str, source: str) -> None:
        """The shard set as the run's training dataset input (`log_dataset_input`); a
        failure is a warning."""
        if not self.enabled:
            return
        try:
            log_dataset_input(self._client, self.run_id, name, digest, source)
        except Exception as exc:  # noqa: BLE001 - a tracking failure must not stop training
            print(f"warning: could not log the dataset input ({type(exc).__name__}: {str(exc)[:200]})",
                  file=sys.stderr)

    def log(self, metrics: dict, step: int, timestamp_ms: int | None = None, flush: bool = True) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if flush:
            self.flush()

    def flush(self) -> bool:
        if not self.enabled or not self.pending:
            return True
        try:
            while self.pending:  # drop each chunk only once it is sent
                self._client.log_batch(self.run_id, metrics=self.pending[:500])
                self.pending = self.pending[500:]
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not stop training
            print(f"warning: MLflow unreachable ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"{len(self.pending)} metric values buffered, will retry", file=sys.stderr)
            return False
        return True


def set_event_tag(client, run_id: str, step: int, kind: str, text: str) -> None:
    """An event of the stage (a resize, a preemption, a recipe change) as the run's tag
    `event.<global step, 9 digits>.<kind>` = what happened and why: the UI lists them in
    step order, and a replayed event sets the same tag again. Raises on failure."""
    client.set_tag(run_id, f"event.{int(step):09d}.{kind}", text[:5000])


def log_dataset_input(client, run_id: str, name: str, digest: str, source: str) -> None:
    """The shard set as the run's training dataset input, once per digest (MLflow keeps at
    most 36 characters of a digest: the data hash's first 32 hex digits). Raises on failure."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run = client.get_run(run_id)
    if any(d.dataset.digest == digest[:32] for d in run.inputs.dataset_inputs):
        return
    dataset = Dataset(name=name, digest=digest[:32], source_type="local" if "://" not in source else "s3",
                      source=json.dumps({"uri": source, "data_hash": digest}))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])


def last_logged_step(client, run_id: str, metric: str) -> int | None:
    """The highest step of `metric` in the run, None when it has none. Raises when the
    store does not answer (which is not the same as "none")."""
    return max((m.step for m in client.get_metric_history(run_id, metric)), default=None)


def send_metrics(client, run_id: str, values: list[tuple[str, float, int, int]]) -> None:
    """(key, value, timestamp ms, step) values in one call (at most 1000). Raises on failure."""
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v, ts, step in values])


CHECKPOINT_TAGS = ("checkpoint", "last_good_checkpoint", "init_checkpoint")  # a stage run's checkpoint URIs


def checkpoint_references(uri: str) -> dict:
    """What the store knows about checkpoints, for `python -m pipeline prune`: every plan
    run (`plans`: name -> start time, status), every stage run (`stages`: plan run, stage,
    attempt, Ray Train run name, status, the checkpoints its tags name) and each checkpoint
    a registered model version was made from (`registered`: checkpoint -> ["name vN"]).
    Raises TrackingUnreachable: without these facts nothing may be deleted."""
    from mlflow.exceptions import MlflowException

    try:
        client = _client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs, token = [], None
        while experiments:
            page = client.search_runs(experiments, max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                break
        plans, stages, by_id = {}, [], {}
        for r in runs:
            tags = r.data.tags
            by_id[r.info.run_id] = tags
            if tags.get("kind") == "plan" and "plan_run" in tags:
                plans[tags["plan_run"]] = {"start": r.info.start_time or 0, "status": r.info.status}
            elif tags.get("kind") == "stage" and "plan_run" in tags:
                stages.append({"plan_run": tags["plan_run"], "stage": tags.get("stage", "?"),
                               "attempt": int(tags.get("attempt", "1")),
                               "trial": tags.get("trial") or f"{tags['plan_run']}-{tags.get('stage', '?')}",
                               "status": r.info.status, "start": r.info.start_time or 0,
                               "checkpoints": [tags[k] for k in CHECKPOINT_TAGS if tags.get(k) not in (None, "none")]})
        registered: dict[str, list[str]] = {}
        for model in client.search_registered_models():
            for version in client.search_model_versions(f"name = '{model.name}'"):
                checkpoint = by_id.get(version.run_id, {}).get("checkpoint")
                if checkpoint:
                    registered.setdefault(checkpoint, []).append(f"{version.name} v{version.version}")
    except (MlflowException, OSError) as exc:
        raise TrackingUnreachable(f"{uri}: {str(exc)[:300]}") from exc
    return {"plans": plans, "stages": stages, "registered": registered}
