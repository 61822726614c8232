"""Distributed SSJDN training on Ray Train from WebDataset shards, with checkpoints and resume on any storage URL.

    summary = run_training(TrainOptions(config="cpu-small", shards="s3://bucket/ucm", storage="s3://bucket/runs"))
    ssjdn train --config cpu-small --shards s3://bucket/ucm --storage s3://bucket/runs   (pipelines.train.cli)

Driver side (this module): load the config, read the shard manifest and refuse what cannot work *before* any
worker starts (no shards, no train/val split, fewer shards than workers, a run directory that belongs to
another dataset or config), record the run identity (`run.json`), then run `TorchTrainer` with
`RunConfig(storage_path=STORAGE, name=RUN)`: the same name continues the same run (`--resume auto`).
Worker side: `pipelines.train.worker`. Files of a run: `pipelines.train.rundir`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.errors import PipelineError
from pipelines.ray_env import worker_env
from pipelines.train.options import TrainOptions

log = logging.getLogger("pipelines.train")

# Config keys that may change when a run is resumed (they do not change what a checkpoint means).
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.num_workers", "train.eval_batch_size")


class TrainSetupError(PipelineError, ValueError):
    """The run cannot start: the message names the shards/run URL and what is wrong. Raised before any worker."""


class TrainingError(PipelineError, RuntimeError):
    """The run started and failed; the message says why and where the last good checkpoint is."""


# ----------------------------------------------------------------------------------------------- preflight


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        path = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{path}.")
        elif va != vb:
            out.append(path)
    return out


def _train_captions(manifest: dict[str, Any], shards_url: str, storage_options) -> list[str]:
    """Every caption of the train split (the GRU text encoder's vocabulary comes from them)."""
    from pipelines.shard.read import list_shards, open_shards

    captions: list[str] = []
    for sample in open_shards(
        list_shards(shards_url, "train", storage_options, manifest=manifest), storage_options=storage_options
    ):
        captions.extend(sample["meta"].get("captions") or ([sample["txt"]] if sample.get("txt") else []))
    return captions


def _shard_refs(manifest: dict[str, Any], shards_url: str, split: str, storage_options, where: str):
    """The split's shards from the manifest; a path leaving the shard folder is refused before any worker."""
    from pipelines.train.spec import shard_refs

    try:
        return shard_refs(manifest, shards_url, split, storage_options)
    except PipelineError as exc:
        raise TrainSetupError(f"{where}: the {split} shards of the manifest cannot be read: {exc}") from None


@dataclass
class Prepared:
    """What the preflight established; `spec` is the worker's `LoopSpec` as plain data."""

    cfg: Any
    run_name: str
    run_url: str
    manifest: dict[str, Any]
    spec: dict[str, Any]
    resuming: bool


def prepare(opts: TrainOptions) -> Prepared:
    """Validate everything that can be validated without Ray; write `run.json` for a new run."""
    from pipelines.fsio import StorageError, describe_endpoint
    from pipelines.shard.read import read_manifest
    from pipelines.train.rundir import RunDir, default_run_name, run_url
    from pipelines.train.spec import LoopSpec
    from ssjdn.config import ConfigError, apply_overrides, config_to_dict, load_config

    if opts.resume not in ("auto", "never"):
        raise TrainSetupError(f"--resume must be auto or never, not {opts.resume!r}")
    if opts.workers < 1:
        raise TrainSetupError("--workers must be >= 1")
    try:
        cfg = load_config(opts.config, opts.overrides or None)
        if opts.epochs is not None:
            cfg = apply_overrides(cfg, {"train.epochs": int(opts.epochs)})
    except ConfigError as exc:
        raise TrainSetupError(str(exc)) from None

    where = describe_endpoint(opts.shards, opts.storage_options)
    try:
        manifest = read_manifest(opts.shards, opts.storage_options)
    except FileNotFoundError as exc:
        raise TrainSetupError(f"no shards at {where}: {exc}") from None
    except StorageError as exc:
        raise TrainSetupError(f"cannot read the shard manifest at {where}: {exc}") from None
    from pipelines.shard.layout import FORMAT as SHARD_FORMAT

    if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise TrainSetupError(f"{where}: _manifest.json is not a {SHARD_FORMAT} manifest (format {got!r})")
    splits = manifest.get("splits", {})
    dataset = manifest.get("dataset", {})
    ds_name = dataset.get("name", "?")
    if not splits.get("train", {}).get("samples"):
        raise TrainSetupError(
            f"{where}: dataset {ds_name!r} has no train shards (splits: {sorted(splits) or 'none'})"
        )
    train = _shard_refs(manifest, opts.shards, "train", opts.storage_options, where)  # paths checked here
    eval_split = (
        "val"
        if splits.get("val", {}).get("samples")
        else "test"
        if splits.get("test", {}).get("samples")
        else None
    )
    if eval_split is None:
        raise TrainSetupError(
            f"{where}: dataset {ds_name!r} has neither a val nor a test split to evaluate on"
        )
    if eval_split == "test":
        log.warning(
            "%s has no val split: epochs are evaluated (and the best model chosen) on the test split", where
        )
    if len(train) < opts.workers:
        raise TrainSetupError(
            f"{where}: the train split has {len(train)} shard(s) for {opts.workers} workers; every worker needs "
            "at least one (re-shard with a smaller --maxcount, or use fewer --workers)"
        )
    evals = _shard_refs(manifest, opts.shards, eval_split, opts.storage_options, where)

    classes = [c["name"] for c in manifest.get("classes", [])]
    if cfg.model.lsd:
        have = cfg.model.lsd_cfg.num_classes
        if len(classes) < 2:
            raise TrainSetupError(
                f"{where}: model.lsd needs scene classes but dataset {ds_name!r} has {len(classes)}"
                " (train with --set model.lsd=false)"
            )
        if have and have != len(classes):
            raise TrainSetupError(
                f"config {opts.config!r} expects {have} classes (model.lsd_cfg.num_classes) but "
                f"dataset {ds_name!r} at {where} has {len(classes)}: shards of another dataset?"
            )
        cfg = apply_overrides(cfg, {"model.lsd_cfg.num_classes": len(classes)})

    name = opts.name or default_run_name(cfg.name, ds_name)
    try:
        url = run_url(opts.storage, name)
    except ValueError as exc:
        raise TrainSetupError(str(exc)) from None
    run = RunDir(url, opts.storage_options)
    identity = {
        "name": name,
        "dataset": {"name": ds_name, "fingerprint": dataset.get("fingerprint"), "classes": classes},
        "shards": opts.shards,
        "config": config_to_dict(cfg),
    }
    existing = run.read_json("run.json")
    resuming = existing is not None
    if resuming:
        if opts.resume == "never":
            raise TrainSetupError(
                f"{url} already holds run {name!r}: continue it with --resume auto, "
                "or start another one with --name"
            )
        theirs = existing.get("dataset", {})
        if theirs.get("fingerprint") != identity["dataset"]["fingerprint"]:
            raise TrainSetupError(
                f"run {url} was trained on dataset {theirs.get('name')!r} (fingerprint "
                f"{str(theirs.get('fingerprint'))[:12]}) but {where} holds dataset {ds_name!r} (fingerprint "
                f"{str(identity['dataset']['fingerprint'])[:12]}): shards of another dataset; use another --name"
            )
        changed = [
            k
            for k in _config_diff(existing.get("config", {}), identity["config"])
            if k not in RESUMABLE_CHANGES
        ]
        changed = [k for k in changed if k != "model.text.name" or cfg.model.text.name != "default"]
        if changed:
            raise TrainSetupError(
                f"run {url} was started with another config (differs in {', '.join(changed)}); "
                "resume with the same config, or use another --name"
            )
        log.info("continuing run %s (dataset %s)", url, ds_name)
    else:
        run.write_json("run.json", {**identity, "created": time.time()})
        log.info(
            "new run %s: config %s, dataset %s (%d train / %d %s samples in %d / %d shards)",
            url,
            cfg.name,
            ds_name,
            sum(s.samples for s in train),
            sum(s.samples for s in evals),
            eval_split,
            len(train),
            len(evals),
        )
    if run.exists("fatal.json"):
        stale = f"fatal-{int(time.time())}.json"
        run.move("fatal.json", stale)
        log.warning(
            "%s: the previous attempt stopped on an error (kept as %s); starting again from the last checkpoint",
            url,
            stale,
        )

    tokenizer_state = None
    if cfg.model.text.kind == "gru":
        # Built every time (deterministic from the train captions): the run may hold checkpoint folders that Ray
        # never committed, so "has checkpoints" cannot decide; a resumed worker uses its checkpoint's vocabulary.
        from ssjdn.tokenization import build_tokenizer

        tokenizer_state = build_tokenizer(
            cfg, captions=_train_captions(manifest, opts.shards, opts.storage_options)
        ).state_dict()

    loader_workers = opts.loader_workers if opts.loader_workers is not None else max(1, cfg.train.num_workers)
    spec = LoopSpec(
        config=config_to_dict(cfg),
        run_url=url,
        train_shards=[(s.url, s.samples) for s in train],
        eval_shards=[(s.url, s.samples) for s in evals],
        eval_split=eval_split,
        epochs=cfg.train.epochs,
        dataset=identity["dataset"],
        tokenizer_state=tokenizer_state,
        loader_workers=loader_workers,
        shuffle_buffer=opts.shuffle_buffer,
        max_bad_fraction=opts.max_bad_fraction,
        checkpoint_every=opts.checkpoint_every,
        progress_every=opts.progress_every or cfg.train.log_every,
        audit_keys=opts.audit_keys,
        storage_options=opts.storage_options,
    )
    return Prepared(cfg, name, url, manifest, asdict(spec), resuming)


# ----------------------------------------------------------------------------------------------- Ray


def _init_ray(opts: TrainOptions) -> bool:
    """Connect to (or start) Ray; True when this call started a local Ray for this process."""
    import ray

    from pipelines.logfile import quiet_ray_env, reroute

    if ray.is_initialized():
        return False
    reroute()  # Ray's console handlers (added on import) -> the command's log file
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # A local Ray: enough logical CPUs for the workers and the Train controller.
    cpus = max(os.cpu_count() or 1, int(opts.workers * opts.cpus_per_worker + 0.999) + 1)
    if not os.environ.get("SSJDN_LIBRARY_LOGS_ON_CONSOLE"):
        quiet_ray_env(log_to_driver=True)  # the workers' `ray` loggers at ERROR; their own lines still show
    # Nothing preempts a local machine; the watcher actor only adds a core_worker warning to the output.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True


def _without_placement_group_cleaner(trainer) -> None:
    """On a Ray this process started: drop Ray Train's placement-group cleaner from this trainer's callbacks.

    The cleaner is a detached actor that frees a dead controller's placement groups on a long-lived cluster. A
    local Ray ends with this process, so there is nothing to clean; and without a dashboard (not started
    locally) its state queries fail every few seconds, printing warnings and tracebacks (`Failed to query Ray
    Train Controller actor state`, `Found multiple active Ray instances`). Ray has no switch for it; if its
    internals move, the cleaner simply stays."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return
    default = trainer._create_default_callbacks

    def callbacks():
        return [c for c in default() if not isinstance(c, PlacementGroupCleanerCallback)]

    trainer._create_default_callbacks = callbacks


def build_trainer(opts: TrainOptions, prepared: Prepared):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.rundir import ray_storage
    from pipelines.train.worker import train_loop_per_worker

    storage_path, storage_fs = ray_storage(opts.storage, opts.storage_options)
    resources = {"CPU": opts.cpus_per_worker}
    if opts.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=prepared.spec,
        torch_config=TorchConfig(backend="nccl" if opts.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=opts.workers,
            use_gpu=opts.gpu,
            resources_per_worker=resources,
            placement_strategy=opts.placement,
        ),
        run_config=RunConfig(
            name=prepared.run_name,  # stable: the same name resumes the same run (PITFALLS)
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, opts.keep_checkpoints)),
            # Ray Train's own lines (worker group start, every report and checkpoint, transient warnings of a
            # loaded machine) stay in the Ray session's log files; the workers' progress lines and Ray Train's
            # errors still show, and a failed run fails `fit()` with its reason.
            logging_config=LoggingConfig(
                log_level="INFO" if os.environ.get("SSJDN_LIBRARY_LOGS_ON_CONSOLE") else "ERROR"
            ),
            # Non-secret settings only (Ray logs runtime_env values): workers use their own AWS chain.
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


def _fatal_error(run, fallback: str) -> TrainingError:
    fatal = run.read_json("fatal.json")
    if fatal is None:
        return TrainingError(fallback)
    stale = f"fatal-{int(time.time())}.json"
    run.move("fatal.json", stale)  # the next invocation starts again from the last good checkpoint
    return TrainingError(
        f"training stopped: {fatal['error']}: {fatal['message']}. Last good checkpoint: "
        f"{fatal.get('last_checkpoint') or 'none (no epoch finished)'}; details in {run.url_of(stale)}"
    )


def run_training(opts: TrainOptions) -> dict[str, Any]:
    """Train (or continue) the run and return its summary (also written to `summary.json`)."""
    from pipelines.train.rundir import RunDir

    t0 = time.time()
    prepared = prepare(opts)  # before importing Ray or torch: a refusal is quick
    from ray.train.v2.api.exceptions import TrainingFailedError

    run = RunDir(prepared.run_url, opts.storage_options)
    local_ray = _init_ray(opts)
    trainer = build_trainer(opts, prepared)
    if local_ray:
        _without_placement_group_cleaner(trainer)
    log.info(
        "training %s on %d %s worker(s); run directory %s",
        prepared.cfg.name,
        opts.workers,
        "GPU" if opts.gpu else "CPU",
        prepared.run_url,
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise _fatal_error(run, f"training failed after {opts.max_failures} retries: {exc}") from exc
    finally:
        if local_ray:  # a Ray this job started ends with it (the next job starts its own, quiet one)
            import ray

            ray.shutdown()
    value = result.return_value or {}
    if "fatal" in value or run.exists("fatal.json"):
        raise _fatal_error(run, f"training stopped: {value.get('fatal')}")
    history = run.read_jsonl("metrics.jsonl")
    epochs = [r for r in history if r.get("epoch", 0) > 0]
    split = prepared.spec["eval_split"]
    summary = {
        "run": prepared.run_url,
        "config": prepared.cfg.name,
        "dataset": prepared.spec["dataset"]["name"],
        "workers": opts.workers,
        "gpu": opts.gpu,
        "epochs": len(epochs),
        "step": value.get("step"),
        "eval_split": split,
        "untrained": next((r.get(split) for r in history if r.get("epoch") == 0), None),
        "final": epochs[-1].get(split) if epochs else None,
        "best_mr": max((r[split]["mr"] for r in epochs), default=None),
        "last_checkpoint": value.get("last_checkpoint")
        or (result.checkpoint.path if result.checkpoint else None),
        "metrics": run.url_of("metrics.jsonl"),
        "wall_s": round(time.time() - t0, 1),
    }
    run.write_json("summary.json", summary)
    log.info(
        "done: %d epoch(s), best %s mR %s; metrics %s; last checkpoint %s",
        summary["epochs"],
        split,
        summary["best_mr"],
        summary["metrics"],
        summary["last_checkpoint"],
    )
    return summary
