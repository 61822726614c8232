"""Retrieval-quality ablation benchmark: VSE++ baseline, +BSD, +LSD, +STL, full SSJDN, BSD variants, InfoNCE.

    nice -n 19 python -m benchmarks.quality --data ../shared/data/ucm-captions \
        --configs vsepp,bsd,lsd,stl,lsd_stl,full,infonce --seeds 3 --epochs 3 --out runs/quality-3ep --jobs 1

    # STL's convergence claim: val mR every 10 steps in epoch 1 and per epoch, steps to 80 % of the best final
    nice -n 19 python -m benchmarks.quality --data ../shared/data/ucm-captions --convergence \
        --configs full,full_triplet,infonce --seeds 3 --epochs 3 --out runs/quality-3ep --jobs 1 \
        --plot docs/img/convergence.png

Every (configuration, seed) is one `ssjdn train-local` run in its own process (own thread count, crash
isolation) on the same base config, text encoder, epochs and step cap. The number reported per run is the
test-split metrics of the checkpoint with the best *val* mR (`best.pt`; test never selects anything).

RECORDS/DATA--BASE--CONFIG--eE--sSEED.json  the run's small result record (committed: benchmarks/results/quality/);
                         a run whose record exists with the same spec is skipped, on any machine
OUT/runs/CONFIG-sSEED/   the train-local run directory plus result.json (written last: the "done" marker)
OUT/results.json         every selected run (spec, per-run test metrics, wall time, load average)
OUT/results.md           mean ± std over seeds per configuration, per-seed values, paired differences
OUT/convergence.{md,json} and the plot (`--convergence`)

Re-running with the same OUT skips finished runs and continues unfinished ones from their last.pt.
`--curve-every N` (on with `--convergence`) also evaluates val every N steps of the first epoch, in the
train-local process itself (`_train-local N`: the same training, only extra evaluations; its metrics are
the same as without it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.quality")

# Overrides of the base config (cpu-small: BSD + LSD + STL in contrastive form). Every ablation keeps the same
# backbone and text encoder, and names its loss, so a change of the YAML's default loss leaves every record valid.
CONFIGS: dict[str, dict[str, Any]] = {
    "vsepp": {"model.bsd": False, "model.lsd": False, "loss.name": "triplet", "loss.variant": "hardest"},
    "bsd": {"model.bsd": True, "model.lsd": False, "loss.name": "triplet", "loss.variant": "hardest"},
    "lsd": {"model.bsd": False, "model.lsd": True, "loss.name": "triplet", "loss.variant": "hardest"},
    # Without LSD there are no posteriors: STL's agreement must come from the scene labels.
    "stl": {
        "model.bsd": False,
        "model.lsd": False,
        "loss.name": "stl",
        "loss.variant": "hardest",
        "loss.stl.agreement": "labels",
    },
    "full": {"model.bsd": True, "model.lsd": True, "loss.name": "stl", "loss.variant": "hardest"},
    # The full model (BSD + LSD) with InfoNCE in place of STL: the contrastive reference on the same network.
    "infonce": {"model.bsd": True, "model.lsd": True, "loss.name": "infonce"},
    # Full minus BSD: what BSD adds on top of the other two parts (bsd alone vs vsepp measures it in isolation).
    "lsd_stl": {"model.bsd": False, "model.lsd": True, "loss.name": "stl", "loss.variant": "hardest"},
    # Tried when full did not beat vsepp at a 1-epoch budget: the LSD cross-entropy (~2.7) dwarfs the retrieval
    # loss (~0.47) and, through the global grad clip (2.0), shrinks the retrieval update about 4x. Weight it down.
    "full_lsdw02": {
        "model.bsd": True,
        "model.lsd": True,
        "loss.name": "stl",
        "loss.variant": "hardest",
        "loss.lsd_weight": 0.2,
    },
    # STL's convergence claim: the full network with the plain hardest-negative triplet (VSE++'s loss).
    "full_triplet": {"model.bsd": True, "model.lsd": True, "loss.name": "triplet", "loss.variant": "hardest"},
    # STL in contrastive form: InfoNCE whose same-class negatives are down-weighted by STL's constant.
    "full_stlnce": {"model.bsd": True, "model.lsd": True, "loss.name": "stl_nce"},
    # ... and its network without BSD: what BSD adds when the loss is the contrastive STL.
    "lsd_stlnce": {"model.bsd": False, "model.lsd": True, "loss.name": "stl_nce"},
}
_FULL = CONFIGS["full"]
# BSD variants (issue 17, model.bsd_cfg; docs/model.md): each is `full` with one BSD change. lsd_stl (bsd off)
# is the same network for all of them, since the variant keys have no effect without BSD.
BSD_VARIANTS: dict[str, dict[str, Any]] = {
    "full_parallel": {"model.bsd_cfg.direction": "parallel"},  # (a) suppression from all other scales at once
    "full_scaleloss": {"model.bsd_cfg.scale_loss_weight": 0.5},  # (b) each clue retrieves on its own
    "full_gate": {"model.bsd_cfg.fusion": "gate"},  # (c) learned gate over the clues
    "full_content": {"model.bsd_cfg.suppression": "content"},  # (d) extraction/suppression map by content
}
CONFIGS.update({name: {**_FULL, **extra} for name, extra in BSD_VARIANTS.items()})
# The loss that val picked (seeds 0-1) with the BSD variant that val picked (scale loss) and with the one that
# test liked best (content suppression), to see whether the two changes add up.
CONFIGS["full_stlnce_scaleloss"] = {**CONFIGS["full_stlnce"], **BSD_VARIANTS["full_scaleloss"]}
CONFIGS["full_stlnce_content"] = {**CONFIGS["full_stlnce"], **BSD_VARIANTS["full_content"]}
CONVERGENCE_CONFIGS = ("full", "full_triplet", "infonce")
# The configuration `cpu-small.yaml` (and the dataset configs) default to: the best mean val mR at 3 epochs x 3 seeds.
DEFAULT_CONFIG = "full_stlnce"
# The acceptance comparison runs first so it finishes even when the time runs out.
PRIORITY = ("vsepp", "full")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECORDS = REPO / "benchmarks" / "results" / "quality"
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr", "cls_mr")


def _fmt_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def resolved_config(base_config: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The whole configuration a run trains with (base YAML + overrides), as plain data."""
    from ssjdn.config import config_to_dict, load_config

    # Through JSON, so a fresh spec compares equal to one read back from a record (tuples become lists).
    return json.loads(json.dumps(config_to_dict(load_config(base_config, overrides))))


def run_spec(config: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides a run's result; a finished run is reused only when its spec is identical.

    The dataset is named by its folder name (not the absolute path), so records made on one machine are valid
    on another with the same data. `resolved` is the full configuration: when a default in the base YAML
    changes, a record made under the old default no longer matches (instead of silently standing in)."""
    overrides = {**CONFIGS[config], "train.seed": seed}
    return {
        "config": config,
        "seed": seed,
        "base_config": args.base_config,
        "overrides": overrides,
        "resolved": resolved_config(args.base_config, {**overrides, "train.epochs": args.epochs}),
        "epochs": args.epochs,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "data": Path(args.data).resolve().name,
        # A fine val curve is a different record (same training, more evaluations): the convergence table
        # needs it, and a run recorded without it must not stand in for it.
        **({"curve_every": args.curve_every} if args.curve_every else {}),
    }


def _same_spec(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Same run? With both resolved configurations, those decide (the override lists may differ in what they
    spell out); a record made before `resolved` existed compares by its overrides. Older records named the data
    by absolute path: compare by folder name."""
    if a is None:
        return False

    def key(spec: dict[str, Any], by_resolved: bool) -> dict[str, Any]:
        drop = "overrides" if by_resolved else "resolved"
        return {**{k: v for k, v in spec.items() if k != drop}, "data": Path(str(spec.get("data"))).name}

    by_resolved = "resolved" in a and "resolved" in b
    return key(a, by_resolved) == key(b, by_resolved)


def record_name(spec: dict[str, Any]) -> str:
    cap = f"--m{spec['max_steps_per_epoch']}" if spec.get("max_steps_per_epoch") else ""
    cap += f"--c{spec['curve_every']}" if spec.get("curve_every") else ""
    base = Path(spec["base_config"]).stem
    return f"{spec['data']}--{base}--{spec['config']}--e{spec['epochs']}{cap}--s{spec['seed']}.json"


def queue_order(configs: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    first = [c for c in configs if c in PRIORITY]
    rest = [c for c in configs if c not in PRIORITY]
    return [(c, s) for s in seeds for c in first] + [(c, s) for s in seeds for c in rest]


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),  # torch's intra-op pool size is read from this at import
            "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE",  # spinning OpenMP threads starve parallel jobs on a shared CPU
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


class _LoadSampler:
    """Samples the 1-minute load average every `every` seconds while a run trains."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> _LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {
            "mean": round(sum(self.samples) / len(self.samples), 2),
            "min": round(min(self.samples), 2),
            "max": round(max(self.samples), 2),
        }


def read_record(path: Path) -> dict[str, Any]:
    """A run's result record; a file that is not a JSON object with a spec is a ValueError naming it (the file
    is left where it is: delete it to rerun that run)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable result record ({exc})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("spec"), dict):
        raise ValueError(f"{path}: not a result record (no spec)")
    return rec


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve_points(run_dir: Path) -> list[dict[str, Any]]:
    """Val (and test) mR after every epoch (epoch 0 = untrained) and, when recorded, every N steps of epoch 1."""
    points = []
    for r in _read_jsonl(run_dir / "metrics.jsonl"):
        if "val" in r:
            points.append(
                {
                    "step": r["step"],
                    "epoch": r["epoch"],
                    "val_mr": r["val"]["mr"],
                    "test_mr": r.get("test", {}).get("mr"),
                }
            )
    for r in _read_jsonl(run_dir / "curve.jsonl"):
        points.append({"step": r["step"], "epoch": None, "val_mr": r["val_mr"], "test_mr": None})
    return sorted(points, key=lambda p: (p["step"], p["epoch"] is None))


def machine_info() -> dict[str, str]:
    """Where a run was made: the same spec and seed give other numbers on another CPU (float reduction order)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__}


def _record_from_run(
    spec: dict[str, Any], run_dir: Path, wall: float, threads: int, load: dict | None
) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary.get("best") or {}
    if "test" not in best:
        raise RuntimeError(f"{run_dir / 'summary.json'} has no best-epoch test metrics (no test split?)")
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    return {
        "spec": spec,
        "best_epoch": best["epoch"],
        "val": best.get("val", {}),
        "test": best["test"],
        "untrained_test_mr": summary.get("untrained", {}).get("test", {}).get("mr"),
        "train_s": round(sum(r.get("train_s", 0.0) for r in rows), 1),
        "wall_s": round(wall, 1),
        "threads": threads,
        "load_avg_1m": load,
        "machine": machine_info(),
        "curve": _curve_points(run_dir),
        "out": str(run_dir),
    }


def train_one(
    spec: dict[str, Any],
    run_dir: Path,
    threads: int,
    *,
    data_path: str | None = None,
    records: Path | None = None,
    curve_every: int = 0,
) -> dict[str, Any]:
    """Train one (config, seed) with `ssjdn train-local` in a subprocess; return its result record.

    Skipped when `records/<record_name>` or `run_dir/result.json` holds a record of the same spec (the latter is
    then copied into `records`)."""
    rec_path = records / record_name(spec) if records is not None else None
    if rec_path is not None and rec_path.exists():
        prev = read_record(rec_path)
        if not _same_spec(prev.get("spec"), spec):
            raise ValueError(
                f"{rec_path} was made with a different spec ({prev.get('spec')}) than requested ({spec}): "
                "the configuration changed; delete that record to rerun it"
            )
        log.info("skip %s seed %d: recorded in %s", spec["config"], spec["seed"], rec_path)
        return {**prev, "status": "skipped"}
    done = run_dir / "result.json"
    if done.exists():
        prev = read_record(done)
        if not _same_spec(prev.get("spec"), spec):
            raise ValueError(
                f"{done} was made with a different spec ({prev.get('spec')}) than requested ({spec}): "
                "use another --out or delete that run directory"
            )
        log.info("skip %s seed %d: finished (%s)", spec["config"], spec["seed"], done)
        prev = {**prev, "spec": spec}
        prev.setdefault("curve", _curve_points(run_dir))
        if rec_path is not None:
            _write_json_atomic(rec_path, prev)
        return {**prev, "status": "skipped"}
    run_dir.mkdir(parents=True, exist_ok=True)
    # `ssjdn train-local`'s own parser and run function, without importing every other CLI command (other jobs'
    # modules): see train_with_curve.
    cmd = [sys.executable, "-m", "benchmarks.quality", "_train-local", str(curve_every)]
    cmd += [
        "--config",
        spec["base_config"],
        "--data",
        str(Path(data_path or spec["data"]).resolve()),
        "--out",
        str(run_dir),
        "--epochs",
        str(spec["epochs"]),
        "--device",
        "cpu",
        "--resume",
        "--no-progress",
    ]
    if spec["max_steps_per_epoch"]:
        cmd += ["--max-steps-per-epoch", str(spec["max_steps_per_epoch"])]
    for k, v in spec["overrides"].items():
        cmd += ["--set", f"{k}={_fmt_value(v)}"]
    log.info("start %s seed %d -> %s", spec["config"], spec["seed"], run_dir)
    t0 = time.time()
    with (run_dir / "train.log").open("a") as logf, _LoadSampler() as load:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_child_env(threads), cwd=REPO)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{spec['config']} seed {spec['seed']} failed (exit {proc.returncode}): see {run_dir / 'train.log'}"
        )
    record = _record_from_run(spec, run_dir, wall, threads, load.summary())
    _write_json_atomic(done, record)
    if rec_path is not None:
        _write_json_atomic(rec_path, record)
    log.info(
        "done %s seed %d: test mR %.2f (best val epoch %d, %.0fs)",
        spec["config"],
        spec["seed"],
        record["test"]["mr"],
        record["best_epoch"],
        wall,
    )
    return {**record, "status": "trained"}


# --- per-step validation inside the train-local process ------------------------------------------------------
def run_train_local(argv: list[str]) -> int:
    """`ssjdn train-local ARGV` through that command's own parser and `run` (ssjdn_cli/train_local.py)."""
    from ssjdn_cli import train_local as command

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="ssjdn train-local")
    command.configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(command.run(args) or 0)


def train_with_curve(every: int, argv: list[str]) -> int:
    """Run `ssjdn train-local ARGV` and evaluate val every `every` steps of the first epoch (-> OUT/curve.jsonl).

    Wraps three of `ssjdn.train_local`'s module-level names to see the val set, tokenizer and loader, and its
    `train_step` to evaluate after it; the training itself (data order, RNG, updates) is untouched: evaluation
    runs in eval mode without randomness and restores train mode. `every` = 0: plain train-local."""
    if every <= 0:
        return run_train_local(argv)
    import ssjdn.train_local as tl
    from ssjdn.engine import evaluate

    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--out", required=True)
    opts.add_argument("--max-steps-per-epoch", type=int, default=None)
    opts.add_argument("--resume", action="store_true")
    known, _ = opts.parse_known_args(argv)
    out = Path(known.out)
    curve_path = out / "curve.jsonl"
    resumed = known.resume and (out / "last.pt").exists()  # epoch 1 (and its curve) is done then
    if not resumed:
        out.mkdir(parents=True, exist_ok=True)
        curve_path.write_text("")
    state: dict[str, Any] = {"eval_sets": [], "steps": 0}
    orig = {n: getattr(tl, n) for n in ("build_eval_set", "build_tokenizer", "DataLoader", "train_step")}

    def capture(name: str, key: str):
        def wrapped(*a, **k):
            value = orig[name](*a, **k)
            if key == "eval_sets":
                state["eval_sets"].append(value)
            else:
                state[key] = value
            return value

        return wrapped

    def train_step(model, batch, *a, **k):
        stats = orig["train_step"](model, batch, *a, **k)
        state["steps"] += 1
        n = state["steps"]
        first_epoch = min(len(state["loader"]), known.max_steps_per_epoch or len(state["loader"]))
        val = state["eval_sets"][0] if state["eval_sets"] else None
        if not resumed and val is not None and n % every == 0 and n < first_epoch:
            t0 = time.time()
            cfg = model.cfg
            res = evaluate(
                model, state["tokenizer"], val, batch_size=cfg.train.eval_batch_size, amp=cfg.train.amp
            )
            row = {"step": n, "val_mr": res["mr"], "eval_s": round(time.time() - t0, 2)}
            with curve_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("step %d: val mR %.2f", n, res["mr"])
        return stats

    tl.build_eval_set = capture("build_eval_set", "eval_sets")
    tl.build_tokenizer = capture("build_tokenizer", "tokenizer")
    tl.DataLoader = capture("DataLoader", "loader")
    tl.train_step = train_step
    try:
        return run_train_local(argv)
    finally:
        for name, fn in orig.items():
            setattr(tl, name, fn)


# --- reports -------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None  # not NaN: results.json stays strict JSON
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))  # sample std (ddof=1)


def last_epoch_test_mr(record: dict[str, Any]) -> float | None:
    """Test mR of the checkpoint at the end of the budget: the reading without checkpoint selection, which
    shows when the best-val pick landed on an early epoch whose val is within noise of the last."""
    ends = [
        p for p in record.get("curve") or [] if p.get("epoch") is not None and p.get("test_mr") is not None
    ]
    if not ends:
        return None
    last = max(ends, key=lambda p: p["epoch"])
    return float(last["test_mr"]) if last["epoch"] == record["spec"].get("epochs", last["epoch"]) else None


def aggregate(records: list[dict[str, Any]], configs: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for c in configs:
        runs = sorted((r for r in records if r["spec"]["config"] == c), key=lambda r: r["spec"]["seed"])
        if not runs:
            continue
        stats = {
            k: _mean_std([float(r["test"][k]) for r in runs]) for k in METRIC_KEYS if k in runs[0]["test"]
        }
        val = [float(r["val"]["mr"]) for r in runs if "mr" in r.get("val", {})]
        loads = [r["load_avg_1m"]["mean"] for r in runs if r.get("load_avg_1m")]
        last = [last_epoch_test_mr(r) for r in runs]
        last = last if None not in last else []
        out[c] = {
            "seeds": [r["spec"]["seed"] for r in runs],
            "mean": {k: v[0] for k, v in stats.items()},
            "std": {k: v[1] for k, v in stats.items()},
            "per_seed_test_mr": [round(float(r["test"]["mr"]), 2) for r in runs],
            "per_seed_val_mr": [round(v, 2) for v in val],
            "val_mr_mean": _mean_std(val)[0] if val else None,
            "val_mr_std": _mean_std(val)[1] if val else None,
            "epochs": runs[0]["spec"].get("epochs"),
            "per_seed_best_epoch": [r.get("best_epoch") for r in runs],
            "per_seed_last_mr": [round(v, 2) for v in last],
            "last_mr_mean": _mean_std(last)[0] if last else None,
            "last_mr_std": _mean_std(last)[1] if last else None,
            "train_s_mean": _mean_std([r["train_s"] for r in runs])[0],
            "load_avg_mean": round(sum(loads) / len(loads), 1) if loads else None,
        }
    return out


def _mr(record: dict[str, Any], split: str) -> float | None:
    return last_epoch_test_mr(record) if split == "last" else float(record[split]["mr"])


def paired_differences(records: list[dict[str, Any]], a: str, b: str, split: str = "test") -> dict | None:
    """Per-seed differences a - b of `split` mR ("test", "val", or "last": test at the end of the budget) over
    the seeds both have; mean ± sample std."""

    def by_seed(config: str) -> dict[int, float]:
        vals = {r["spec"]["seed"]: _mr(r, split) for r in records if r["spec"]["config"] == config}
        return {s: v for s, v in vals.items() if v is not None}

    va, vb = by_seed(a), by_seed(b)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    diffs = [va[s] - vb[s] for s in seeds]
    m, sd = _mean_std(diffs)
    return {
        "a": a,
        "b": b,
        "split": split,
        "seeds": seeds,
        "diffs": [round(d, 2) for d in diffs],
        "mean": m,
        "std": sd,
        "positive": sum(d > 0 for d in diffs),
    }


def bsd_off_twin(config: str, configs: list[str]) -> str | None:
    """The configuration among `configs` that is `config` with only `model.bsd=false` (BSD's own keys have no
    effect without BSD), e.g. full -> lsd_stl."""
    if not CONFIGS[config].get("model.bsd"):
        return None
    twin = {k: v for k, v in CONFIGS[config].items() if not k.startswith("model.bsd_cfg.")}
    twin["model.bsd"] = False
    return next((c for c in configs if CONFIGS[c] == twin), None)


def default_pairs(configs: list[str]) -> list[tuple[str, str]]:
    """Paired comparisons: every BSD configuration against its twin without BSD, and full SSJDN against VSE++."""
    pairs = [(c, twin) for c in configs if (twin := bsd_off_twin(c, configs))]
    pairs += [(c, "vsepp") for c in ("full", DEFAULT_CONFIG) if c in configs and "vsepp" in configs]
    return list(dict.fromkeys(pairs))


def _mean_pm_std(m: float | None, s: float | None) -> str:
    """A table cell: "m ± s", just "m" for one seed, empty when there is no value."""
    if m is None:
        return ""
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def markdown_table(agg: dict[str, dict[str, Any]]) -> str:
    names = {
        "i2t_r1": "I→T R@1",
        "i2t_r5": "I→T R@5",
        "i2t_r10": "I→T R@10",
        "t2i_r1": "T→I R@1",
        "t2i_r5": "T→I R@5",
        "t2i_r10": "T→I R@10",
        "mr": "mR",
        "cls_mr": "class mR",
    }
    cols = [k for k in METRIC_KEYS if any(k in a["mean"] for a in agg.values())]
    lines = [
        "| config | seeds | "
        + " | ".join(names[k] for k in cols)
        + " | val mR | mR last epoch | train s/run |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    for c, a in agg.items():
        cells = [_mean_pm_std(a["mean"].get(k, float("nan")), a["std"].get(k)) for k in cols]
        val = _mean_pm_std(a.get("val_mr_mean"), a.get("val_mr_std"))
        last = _mean_pm_std(a.get("last_mr_mean"), a.get("last_mr_std"))
        lines.append(
            f"| {c} | {len(a['seeds'])} | "
            + " | ".join(cells)
            + f" | {val} | {last} | {a['train_s_mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def val_ranking(agg: dict[str, dict[str, Any]]) -> list[str]:
    """Configurations by mean val mR, best first: the split that picks a default (test never selects)."""
    ranked = [c for c in agg if agg[c].get("val_mr_mean") is not None]
    return sorted(ranked, key=lambda c: -agg[c]["val_mr_mean"])


def details_markdown(agg: dict[str, dict[str, Any]], pairs: list[dict]) -> str:
    lines = ["", "Per-seed test mR (val mR) and mean 1-minute load average during the runs:", ""]
    for c, a in agg.items():
        vals = (
            a["per_seed_val_mr"] if len(a["per_seed_val_mr"]) == len(a["seeds"]) else [None] * len(a["seeds"])
        )
        lasts = a["per_seed_last_mr"] or [None] * len(a["seeds"])
        cells = ", ".join(
            f"s{s} {t:.2f}"
            + ("" if v is None else f" ({v:.2f})")
            + (
                f" [best val at epoch {e}; last epoch {lt:.2f}]"
                if lt is not None and e != a["epochs"]
                else ""
            )
            for s, t, v, e, lt in zip(
                a["seeds"], a["per_seed_test_mr"], vals, a["per_seed_best_epoch"], lasts, strict=True
            )
        )
        load = f"; load {a['load_avg_mean']}" if a.get("load_avg_mean") is not None else ""
        lines.append(f"- {c}: {cells}{load}")
    titles = {
        "test": "Paired per-seed differences of test mR (same seed, same budget):",
        "last": "The same at the end of the budget (last epoch's test mR, no checkpoint selection), where it differs:",
    }
    by_selection = {(p["a"], p["b"]): p["diffs"] for p in pairs if p["split"] == "test"}
    for split, title in titles.items():
        # an end-of-budget pair equal to its best-val pair (every best-val epoch was the last) is not repeated
        chosen = [
            p
            for p in pairs
            if p["split"] == split and (split == "test" or by_selection.get((p["a"], p["b"])) != p["diffs"])
        ]
        if not chosen:
            continue
        lines += ["", title, ""]
        for p in chosen:
            sd = "" if p["std"] is None else f" ± {p['std']:.2f}"
            diffs = ", ".join(f"s{s} {d:+.2f}" for s, d in zip(p["seeds"], p["diffs"], strict=True))
            lines.append(
                f"- {p['a']} − {p['b']}: {p['mean']:+.2f}{sd}, positive on {p['positive']} of "
                f"{len(p['seeds'])} ({diffs})"
            )
    ranking = val_ranking(agg)
    if ranking:
        lines += ["", "By mean val mR (what picks the default; test never selects):", ""]
        lines.append(" > ".join(f"{c} {agg[c]['val_mr_mean']:.2f}" for c in ranking))
    return "\n".join(lines) + "\n"


def write_reports(
    out: Path, records: list[dict[str, Any]], configs: list[str], args: argparse.Namespace
) -> dict:
    agg = aggregate(records, configs)
    pairs = [
        p
        for split in ("test", "last")
        for a, b in default_pairs(configs)
        if (p := paired_differences(records, a, b, split))
    ]
    clean = [{k: v for k, v in r.items() if k != "status"} for r in records]
    _write_json_atomic(
        out / "results.json", {"command": " ".join(sys.argv), "runs": clean, "summary": agg, "paired": pairs}
    )
    header = (
        'Test split, best-val-mR checkpoint ("mR last epoch": the checkpoint at the end of the budget), '
        f"mean ± sample std over seeds. Base config `{args.base_config}`, "
        f"{args.epochs} epochs"
        + (f", ≤{args.max_steps_per_epoch} steps/epoch" if args.max_steps_per_epoch else "")
        + ".\n\n"
    )
    tmp = out / ".results.md.tmp"
    tmp.write_text(header + markdown_table(agg) + details_markdown(agg, pairs))
    os.replace(tmp, out / "results.md")
    return agg


def convergence(records: list[dict[str, Any]], configs: list[str], fraction: float = 0.8) -> dict[str, Any]:
    """Steps each run needs to reach `fraction` x the highest final val mR (mean over seeds) among `configs`."""
    finals: dict[str, list[float]] = {}
    for r in records:
        c = r["spec"]["config"]
        epochs = [p for p in r.get("curve", []) if p["epoch"] is not None]
        if c in configs and epochs:
            finals.setdefault(c, []).append(max(epochs, key=lambda p: p["epoch"])["val_mr"])
    if not finals:
        return {"target": None, "configs": {}}
    final_mean = {c: sum(v) / len(v) for c, v in finals.items()}
    target = fraction * max(final_mean.values())
    table: dict[str, Any] = {}
    for c in configs:
        runs = sorted((r for r in records if r["spec"]["config"] == c), key=lambda r: r["spec"]["seed"])
        if not runs:
            continue
        reach = []
        for r in runs:
            hit = [p["step"] for p in r.get("curve", []) if p["val_mr"] >= target]
            reach.append(min(hit) if hit else None)
        got = [s for s in reach if s is not None]
        table[c] = {
            "seeds": [r["spec"]["seed"] for r in runs],
            "final_val_mr": finals.get(c, []),
            "final_val_mr_mean": final_mean.get(c),
            "steps_to_target": reach,
            "steps_to_target_mean": sum(got) / len(got) if got and len(got) == len(reach) else None,
            "fine_curve": [any(p["epoch"] is None for p in r.get("curve", [])) for r in runs],
        }
    return {"fraction": fraction, "target": target, "configs": table}


def convergence_markdown(conv: dict[str, Any]) -> str:
    if conv.get("target") is None:
        return "No finished runs with a val curve.\n"
    lines = [
        f"Target: {conv['fraction']:.0%} of the highest final val mR (mean over seeds) = {conv['target']:.2f}.",
        "",
        "| config | seeds | final val mR per seed | mean | steps to target per seed | mean steps | curve |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, t in conv["configs"].items():
        finals = " / ".join(f"{v:.2f}" for v in t["final_val_mr"])
        mean = "" if t["final_val_mr_mean"] is None else f"{t['final_val_mr_mean']:.2f}"
        steps = " / ".join("not reached" if s is None else str(s) for s in t["steps_to_target"])
        ms = "" if t["steps_to_target_mean"] is None else f"{t['steps_to_target_mean']:.0f}"
        fine = "every 10 steps in epoch 1 + per epoch" if all(t["fine_curve"]) else "per epoch (some seeds)"
        lines.append(f"| {c} | {len(t['seeds'])} | {finals} | {mean} | {steps} | {ms} | {fine} |")
    return "\n".join(lines) + "\n"


def plot_convergence(records: list[dict[str, Any]], configs: list[str], conv: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, c in enumerate(configs):
        runs = [r for r in records if r["spec"]["config"] == c and r.get("curve")]
        if not runs:
            continue
        color = f"C{i}"
        by_step: dict[int, list[float]] = {}
        for r in runs:
            xs = [p["step"] for p in r["curve"]]
            ys = [p["val_mr"] for p in r["curve"]]
            ax.plot(xs, ys, color=color, alpha=0.25, lw=1)
            for x, y in zip(xs, ys, strict=True):
                by_step.setdefault(x, []).append(y)
        steps = sorted(by_step)
        ax.plot(
            steps,
            [sum(by_step[s]) / len(by_step[s]) for s in steps],
            color=color,
            lw=2,
            marker="o",
            ms=3,
            label=f"{c} ({len(runs)} seed{'s' if len(runs) > 1 else ''})",
        )
    if conv.get("target") is not None:
        ax.axhline(conv["target"], color="gray", ls="--", lw=1, label=f"target {conv['target']:.1f}")
    ax.set_xlabel("training step (batch 32)")
    ax.set_ylabel("val mR")
    ax.set_title("Convergence on UCM-Captions val (mean over seeds; thin: single seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_convergence(out: Path, records: list[dict[str, Any]], configs: list[str], plot: Path) -> dict:
    conv = convergence(records, configs)
    _write_json_atomic(out / "convergence.json", conv)
    (out / "convergence.md").write_text(convergence_markdown(conv))
    if conv.get("target") is not None:
        plot_convergence(records, configs, conv, plot)
    return conv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder (e.g. ../shared/data/ucm-captions)")
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per configuration")
    p.add_argument("--seed-list", default=None, help="explicit comma list of seeds (overrides --seeds)")
    p.add_argument("--epochs", type=int, required=True, help="epochs per run (the same budget for every run)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="step cap per epoch (same for all)")
    p.add_argument("--base-config", default="cpu-small", help="config the ablations override")
    p.add_argument("--out", required=True, help="benchmark folder (runs/, results.json, results.md)")
    p.add_argument(
        "--records",
        default=str(DEFAULT_RECORDS),
        help="folder of per-run result records (committed; a recorded run is skipped); 'none' to disable",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--convergence", action="store_true", help="val curves + steps-to-target table + plot")
    p.add_argument(
        "--curve-every", type=int, default=None, help="val every N steps of epoch 1 (10 with --convergence)"
    )
    p.add_argument("--plot", default=None, help="convergence plot path (default OUT/convergence.png)")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the recorded runs only")
    args = p.parse_args(argv)
    default_configs = CONVERGENCE_CONFIGS if args.convergence else CONFIGS
    args.configs = [c.strip() for c in (args.configs or ",".join(default_configs)).split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    if args.seeds < 1 or args.jobs < 1 or args.epochs < 1:
        p.error("--seeds, --jobs and --epochs must be >= 1")
    args.seed_list = (
        [int(s) for s in args.seed_list.split(",") if s.strip()]
        if args.seed_list
        else list(range(args.seeds))
    )
    if args.curve_every is None:
        args.curve_every = 10 if args.convergence else 0
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records_dir = None if args.records.lower() == "none" else Path(args.records).resolve()
    if args.report_only and (records_dir is None or not records_dir.is_dir()):
        raise SystemExit(
            f"--records {args.records}: not a folder of result records (--report-only reads one)"
        )
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    queue = queue_order(args.configs, args.seed_list)
    log.info("%d runs (%d parallel, %d thread(s) each) -> %s", len(queue), args.jobs, threads, out)

    records: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()  # reports are rewritten by whichever job finishes

    def work(item: tuple[str, int]) -> None:
        config, seed = item
        if args.report_only:
            spec = run_spec(config, seed, args)
            path = records_dir / record_name(spec) if records_dir is not None else None
            if path is None or not path.exists():
                log.info("not recorded: %s seed %d", config, seed)
                return
            try:
                prev = read_record(path)
            except ValueError as exc:
                log.error("%s", exc)
                failures.append(str(exc))
                return
            if _same_spec(prev.get("spec"), spec):
                with lock:
                    records.append({**prev, "status": "skipped"})
            return
        try:
            rec = train_one(
                run_spec(config, seed, args),
                out / "runs" / f"{config}-s{seed}",
                threads,
                data_path=args.data,
                records=records_dir,
                curve_every=args.curve_every,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            log.error("%s", exc)
            failures.append(str(exc))
            return
        with lock:
            records.append(rec)
            write_reports(
                out, records, args.configs, args
            )  # a partial table survives an interrupted benchmark

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(work, queue))
    records.sort(key=lambda r: (args.configs.index(r["spec"]["config"]), r["spec"]["seed"]))
    if records:
        write_reports(out, records, args.configs, args)
        print(markdown_table(aggregate(records, args.configs)))
        if args.convergence:
            plot = Path(args.plot) if args.plot else out / "convergence.png"
            conv = write_convergence(out, records, args.configs, plot)
            print(convergence_markdown(conv))
    log.info("results: %s, %s", out / "results.md", out / "results.json")
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    return records


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_train-local":
        sys.exit(train_with_curve(int(sys.argv[2]), sys.argv[3:]))
    main()
