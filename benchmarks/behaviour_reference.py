"""Behaviour references of the pipeline, recorded through its command-line interface, and their comparison.

Two subcommands:

    record   --ssjdn "CMD" --out DIR [--data ../shared/data] [--only shard,train_local,...] [...]
        Drives the `ssjdn` command line given as CMD (e.g. "ssjdn", or "python -m pipelines.cli" for a checkout
        put first on PYTHONPATH; a leading `python`/`python3` is replaced by this interpreter) in subprocesses and
        writes DIR/reference.json (plus DIR/work/: shards, runs, store, logs; DIR/artifacts/: the checkpoint the
        queries used). What it records, each a named check:
          shard.*        `ssjdn shard DATA/ucm-captions DEST --maxcount 200`: sha256 of every shard tar (path
                         relative to DEST), the manifest's split counts, its dataset and manifest fingerprints;
          train_local.*  `ssjdn train-local --config tiny` (UCM, 2 epochs x 20 steps), run twice: per-epoch
                         metrics.jsonl (timings dropped), a digest of the model weights of best.pt / last.pt, and
                         whether the two runs agreed;
          train_ray.*    `ssjdn train --config tiny --workers 2 --epochs 2` on the shards (local Ray), run twice:
                         per-epoch metrics.jsonl, the plan files (shards, samples, steps, parameter digest per rank),
                         the checkpoint names, weight digests, the driver summary, whether the runs agreed; and a
                         run whose rank 1 SIGKILLs itself mid-epoch (the old code's SSJDN_FAULT_KILL_AT_STEP, with
                         --checkpoint-every): which checkpoint it resumed from and whether it ends like the
                         uninterrupted run;
          embed.*        `ssjdn embed SHARDS STORE --checkpoint best/checkpoint.pt` of the first Ray run (or
                         --query-checkpoint): the run report's counts and the weight digest of the checkpoint;
          query.*        `ssjdn query TEXT --store STORE -k 10 --json` for 3 fixed texts: exact (default; the
                         store is below the cache threshold, so this scans Parquet), --no-cache, --ann, the exact-
                         search matrix cache forced (through the Python API `--query-api`, cache=True: the CLI
                         cannot force it) and the default CLI queries again once that cache exists (it loads
                         it); keys in order, scores, split, class, source. The ANN index build is threaded and
                         not byte-reproducible: query.ann.0's info says whether a rebuilt index gave the same hits;
          tiff.*         TIFF decoding of geotiff/RGBA.uint16.tif and RGBA.byte.tif with the band-level reader
                         (`--band-reader`: sha256, shape, dtype of the array) and `--decode-image` (sha256, mode and
                         size of the RGB image), through `python -c` in the same environment.
        Timings, paths and Ray node ids are kept under each check's "info" and never compared.

    compare  A.json B.json
        Prints every check as `equal` or `different` (with the first difference) and exits 1 on any difference or
        a check missing on one side (`--only-common`: skip those, for partial records). Query checks compare floats
        within 1e-6; everything else must be equal. Record both sides with the same options.

Old code (a worktree at /tmp/ref-main; the venv has /work/main installed editable, so the checkout goes first
on PYTHONPATH and every command runs in DIR/work, never in a source tree):

    cd /work/main && PYTHONPATH=/tmp/ref-main OMP_WAIT_POLICY=PASSIVE .venv/bin/python \\
        -m benchmarks.behaviour_reference record --ssjdn "python -m pipelines.cli" --out /tmp/ref-out
New code:

    cd /work/main && OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m benchmarks.behaviour_reference record \\
        --ssjdn ssjdn --out /tmp/new-out [--query-checkpoint /tmp/ref-out/artifacts/query-checkpoint.pt]
    .venv/bin/python -m benchmarks.behaviour_reference compare /tmp/ref-out/reference.json /tmp/new-out/reference.json

`--query-checkpoint` embeds with the old run's checkpoint, so embed/query are compared independently of training.
About 10 minutes on a shared 2-core machine (Ray runs dominate); `--only` / `--skip` select sections.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECTIONS = ("shard", "train_local", "train_ray", "query", "tiff")  # "query" includes embed
QUERY_TEXTS = (
    "many planes parked at the airport",
    "a river runs through the green forest",
    "a baseball field next to some houses",
)
QUERY_K = 10
SCORE_TOLERANCE = 1e-6
TINY = ["--config", "tiny", "--set", "model.lsd_cfg.num_classes=21"]  # UCM has 21 classes; tiny says 4
TRAIN_LOCAL_ARGS = [*TINY, "--epochs", "2", "--max-steps-per-epoch", "20", "--device", "cpu", "--no-progress"]
TRAIN_RAY_ARGS = [*TINY, "--set", "train.batch_size=32", "--workers", "2", "--epochs", "2"]
KILL_AT_STEP = 40  # epoch 2 (steps 29-56 at batch 32 on 2 ranks), after the mid-epoch checkpoint at step 38
CHECKPOINT_EVERY = 10
TIMING_KEYS = {"seconds", "time", "wall_s", "train_s", "eval_s", "samples_per_s", "first_result_s", "build_seconds"}
MARKER = ".behaviour_reference"

# ------------------------------------------------------------------------------------------------ snippets
# Run with `python -c` in the environment of the code under test; each prints one JSON line last.

WEIGHTS_SNIPPET = r"""
import hashlib, json, sys, torch
out = {}
for label, path in zip(sys.argv[1::2], sys.argv[2::2]):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    sd = ck["model"]
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    out[label] = {"sha256": h.hexdigest(), "tensors": len(sd), "epoch": ck.get("epoch"), "step": ck.get("step")}
print(json.dumps(out))
"""

TIFF_SNIPPET = r"""
import hashlib, importlib, json, sys
import numpy as np

def resolve(spec):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)

decode_image, decode_bands = resolve(sys.argv[1]), resolve(sys.argv[2])
out = {}
for path in sys.argv[3:]:
    name = path.rsplit("/", 1)[-1]
    data = open(path, "rb").read()
    arr = np.ascontiguousarray(decode_bands(data))
    im = decode_image(data, name)
    out[name] = {
        "bands": {"sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "shape": list(arr.shape),
                  "dtype": arr.dtype.str},
        "rgb": {"sha256": hashlib.sha256(im.tobytes()).hexdigest(), "mode": im.mode, "size": list(im.size)},
    }
print(json.dumps(out))
"""

CACHE_QUERY_SNIPPET = r"""
import importlib, json, sys
mod, _, attr = sys.argv[1].partition(":")
query_store = getattr(importlib.import_module(mod), attr)
store, k, texts = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
print(json.dumps([query_store(store, text=t, k=k, cache=True).to_json() for t in texts]))
"""

CODE_SNIPPET = r"""
import json, pipelines, ssjdn
print(json.dumps({"ssjdn": ssjdn.__file__, "pipelines": pipelines.__file__}))
"""


class StepError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def strip_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def relativize(obj: Any, prefixes: dict[str, str]) -> Any:
    """Replace absolute path prefixes (our work folders) inside strings by placeholders."""
    if isinstance(obj, dict):
        return {k: relativize(v, prefixes) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relativize(v, prefixes) for v in obj]
    if isinstance(obj, str):
        for prefix, name in prefixes.items():
            obj = obj.replace(prefix, name)
    return obj


def first_difference(a: Any, b: Any, tol: float, path: str = "") -> str | None:
    """None when equal (numbers within `tol`), else where and how they differ."""
    where = path or "."
    numbers = not isinstance(a, bool) and not isinstance(b, bool) and isinstance(a, (int, float)) \
        and isinstance(b, (int, float))  # fmt: skip
    if not numbers and type(a) is not type(b):
        return f"{where}: {_short(a)} != {_short(b)}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{where}: keys differ ({sorted(set(a) ^ set(b)) or 'same keys, another order'})"
        for k in a:
            d = first_difference(a[k], b[k], tol, f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, tol, f"{path}[{i}]")
            if d:
                return d
        return None
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        if (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol:
            return None
        return f"{where}: {a!r} != {b!r} (diff {abs(a - b):.3g}, tolerance {tol:g})"
    return None if a == b else f"{where}: {_short(a)} != {_short(b)}"


def max_float_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over paired floats (inf when the structures differ otherwise)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return math.inf
        return max((max_float_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((max_float_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    return 0.0 if a == b else math.inf


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 160 else text[:157] + "..."


class Recorder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.logs = self.work / "logs"
        self.artifacts = self.out / "artifacts"
        self.data = Path(args.data).resolve()
        self.python = sys.executable
        self.cli = self._cli(args.ssjdn)
        self.env = {**os.environ}
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.pop("RAY_ADDRESS", None)  # always a local Ray of our own
        self.checks: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, str] = {}
        self.walls: dict[str, float] = {}
        self.shards = self.work / "shards"

    # -------------------------------------------------------------------------------------------- plumbing

    def _cli(self, text: str) -> list[str]:
        argv = shlex.split(text)
        if not argv:
            raise SystemExit("--ssjdn: empty command")
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        elif os.sep not in argv[0] and shutil.which(argv[0]) is None:
            beside = Path(sys.executable).with_name(argv[0])  # a venv's console script, venv not activated
            if beside.exists():
                argv[0] = str(beside)
        return argv

    def check(self, name: str, value: Any, *, tolerance: float = 0.0, info: Any = None) -> None:
        entry: dict[str, Any] = {"value": value, "tolerance": tolerance}
        if info is not None:
            entry["info"] = info
        self.checks[name] = entry

    def run(
        self, label: str, argv: list[str], *, timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, str, float]:
        """Run one command in the work folder (its own process group), log it; (rc, stdout, seconds)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = self.logs / f"{label}.out", self.logs / f"{label}.err"
        shown = [("<snippet>" if i and argv[i - 1] == "-c" else a) for i, a in enumerate(argv)]
        print(f"[record] {label}: {shlex.join(shown)[:300]}", flush=True)
        t0 = time.perf_counter()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(argv, cwd=self.work, env=env or self.env, stdout=out, stderr=err,
                                    start_new_session=True)  # fmt: skip
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started (Ray and loader processes included)
                proc.wait()
                raise StepError(f"{label}: timed out after {timeout:.0f}s (logs: {err_path})") from None
        seconds = round(time.perf_counter() - t0, 2)
        self.walls[label] = seconds
        stdout = out_path.read_text()
        if rc != 0:
            tail = err_path.read_text()[-3000:]
            raise StepError(f"{label}: exit status {rc} (logs: {err_path})\n{tail}")
        print(f"[record] {label}: rc {rc}, {seconds:.1f}s", flush=True)
        return rc, stdout, seconds

    def ssjdn(self, label: str, args: list[str], **kw) -> tuple[int, str, float]:
        return self.run(label, [*self.cli, *args], **kw)

    def snippet(self, label: str, code: str, args: list[str], timeout: float = 300) -> Any:
        _, stdout, _ = self.run(label, [self.python, "-c", code, *args], timeout=timeout)
        return json.loads(stdout.strip().splitlines()[-1])

    def weights(self, label: str, paths: dict[str, Path]) -> dict[str, Any]:
        argv = [x for name, p in paths.items() for x in (name, str(p))]
        return self.snippet(label, WEIGHTS_SNIPPET, argv)

    def section(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except (StepError, OSError, ValueError, KeyError, IndexError, json.JSONDecodeError) as exc:
            print(f"[record] section {name} FAILED: {exc}", file=sys.stderr, flush=True)
            self.failures[name] = str(exc)[:4000]
        self.walls[f"section:{name}"] = round(time.perf_counter() - t0, 2)

    # -------------------------------------------------------------------------------------------- sections

    def record_shard(self) -> None:
        dest = self.shards
        if dest.exists():
            shutil.rmtree(dest)
        self.ssjdn("shard", ["shard", str(self.data / "ucm-captions"), str(dest), "--maxcount", "200",
                             "--no-progress"], timeout=600)  # fmt: skip
        tars = {p.relative_to(dest).as_posix(): sha256_file(p) for p in sorted(dest.rglob("*.tar"))}
        manifest = json.loads((dest / "_manifest.json").read_text())
        self.check("shard.tars", tars)
        self.check("shard.split_counts", manifest["splits"], info={"totals": manifest.get("totals")})
        self.check("shard.fingerprints", {
            "dataset": manifest.get("dataset", {}).get("fingerprint"), "manifest": manifest.get("fingerprint"),
            "shards": [{k: s.get(k) for k in ("path", "split", "samples", "captions", "first_key", "last_key",
                                               "sha256", "digest")} for s in manifest.get("shards", [])],
        })  # fmt: skip

    def _train_local_once(self, tag: str) -> dict[str, Any]:
        out = self.work / f"train-local-{tag}"
        if out.exists():
            shutil.rmtree(out)
        _, stdout, seconds = self.ssjdn(f"train-local-{tag}", ["train-local", *TRAIN_LOCAL_ARGS, "--data",
                                        str(self.data / "ucm-captions"), "--out", str(out)], timeout=600)  # fmt: skip
        metrics = strip_timing(read_jsonl(out / "metrics.jsonl"))
        ckpts = {name: out / name for name in ("best.pt", "last.pt") if (out / name).exists()}
        return {"metrics": metrics, "weights": self.weights(f"train-local-{tag}-weights", ckpts),
                "files": sorted(p.name for p in out.iterdir()), "seconds": seconds,
                "brief": json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else None}  # fmt: skip

    def record_train_local(self) -> None:
        a = self._train_local_once("a")
        info: dict[str, Any] = {"files": a["files"], "wall_s": [a["seconds"]], "brief": a["brief"]}
        same = None
        if self.args.repeat:
            b = self._train_local_once("b")
            info["wall_s"].append(b["seconds"])
            same = {"metrics_equal": a["metrics"] == b["metrics"], "weights_equal": a["weights"] == b["weights"]}
            info["max_metric_diff"] = max_float_diff(a["metrics"], b["metrics"])
        self.check("train_local.metrics", a["metrics"], info=info)
        self.check("train_local.weights", a["weights"])
        if same is not None:
            self.check("train_local.deterministic", same)

    def _train_ray_once(self, tag: str, extra: list[str] | None = None, env: dict[str, str] | None = None):
        storage = self.work / f"runs-{tag}"
        if storage.exists():
            shutil.rmtree(storage)
        ray_tmp = tempfile.mkdtemp(prefix="bref-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
        run_env = {**self.env, "RAY_TMPDIR": ray_tmp, **(env or {})}
        try:
            _, stdout, seconds = self.ssjdn(
                f"train-ray-{tag}",
                ["train", *TRAIN_RAY_ARGS, "--shards", str(self.shards), "--storage", str(storage),
                 "--name", f"ref-{tag}", *(extra or [])],
                timeout=self.args.ray_timeout, env=run_env,
            )  # fmt: skip
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        run = storage / f"ref-{tag}"
        prefixes = {str(self.shards): "<shards>", str(storage): "<storage>"}
        summary = None
        for line in stdout.splitlines():
            if line.startswith("SSJDN_TRAIN_SUMMARY "):
                summary = json.loads(line.split(" ", 1)[1])
        plans = []
        for p in sorted((run / "plan").glob("epoch-*.json")):
            plan = json.loads(p.read_text())
            for r in plan.get("ranks", []):
                r.pop("node_id", None)
            plans.append(relativize(plan, prefixes))
        ckpt_names = sorted(p.name for p in run.glob("checkpoint-*") if p.is_dir())
        weights_of = {"best": run / "best" / "checkpoint.pt"}
        if ckpt_names:
            weights_of["last"] = run / ckpt_names[-1] / "checkpoint.pt"
        return {
            "run": run,
            "metrics": strip_timing(read_jsonl(run / "metrics.jsonl")),
            "plans": plans,
            "checkpoints": ckpt_names,
            "weights": self.weights(f"train-ray-{tag}-weights", weights_of),
            "attempts": relativize(read_jsonl(run / "attempts.jsonl"), prefixes) if (run / "attempts.jsonl").exists()
            else [],
            "summary": summary,
            "seconds": seconds,
            "files": sorted(p.name for p in run.iterdir()),
        }  # fmt: skip

    def record_train_ray(self) -> None:
        a = self._train_ray_once("a")
        self.ray_checkpoint = a["run"] / "best" / "checkpoint.pt"
        keep = ("config", "dataset", "epochs", "step", "best_mr", "eval_split", "untrained", "final", "workers", "gpu")
        summary = {k: a["summary"].get(k) for k in keep} if a["summary"] else None
        info: dict[str, Any] = {"wall_s": [a["seconds"]], "files": a["files"],
                                "driver_wall_s": [(a["summary"] or {}).get("wall_s")]}  # fmt: skip
        self.check("train_ray.metrics", a["metrics"], info=info)
        self.check("train_ray.plan", a["plans"])
        self.check("train_ray.checkpoints", a["checkpoints"])
        self.check("train_ray.weights", a["weights"])
        self.check("train_ray.summary", summary)
        if self.args.repeat:
            b = self._train_ray_once("b")
            info["wall_s"].append(b["seconds"])
            info["driver_wall_s"].append((b["summary"] or {}).get("wall_s"))
            info["max_metric_diff"] = max_float_diff(a["metrics"], b["metrics"])
            self.check("train_ray.deterministic", {
                "metrics_equal": a["metrics"] == b["metrics"], "plan_equal": a["plans"] == b["plans"],
                "weights_equal": a["weights"] == b["weights"], "checkpoints_equal": a["checkpoints"] == b["checkpoints"],
            })  # fmt: skip
        if self.args.kill_resume:
            name, _, value = self.args.kill_env.partition("=")
            k = self._train_ray_once("kill", ["--checkpoint-every", str(CHECKPOINT_EVERY)], env={name: value})

            def no_attempt(rows):
                return [{key: v for key, v in r.items() if key != "attempt"} for r in rows]

            resumes = [
                {"attempt": r.get("attempt"), "epochs_done": r.get("epochs_done"), "step": r.get("step"),
                 "mid_epoch": r.get("mid_epoch"), "resumed_from": (r.get("resumed_from") or "").rsplit("/", 1)[-1]
                 or None, "world_size": r.get("world_size")} for r in k["attempts"]
            ]  # fmt: skip
            self.check("train_ray.kill_resume", {
                "fault": f"{name}={value}, --checkpoint-every {CHECKPOINT_EVERY}",
                "epochs": [r["epoch"] for r in k["metrics"]],
                "attempts": resumes,
                "metrics_equal_uninterrupted": no_attempt(k["metrics"]) == no_attempt(a["metrics"]),
                "weights_equal_uninterrupted": k["weights"] == a["weights"],
                "final_checkpoint": k["checkpoints"][-1] if k["checkpoints"] else None,
            }, info={"wall_s": k["seconds"], "checkpoints": k["checkpoints"]})  # fmt: skip

    def record_query(self) -> None:
        ckpt = Path(self.args.query_checkpoint).resolve() if self.args.query_checkpoint else self.ray_checkpoint
        if ckpt is None or not ckpt.exists():
            raise StepError(f"no checkpoint to embed with ({ckpt}); run train_ray or pass --query-checkpoint")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        kept = self.artifacts / "query-checkpoint.pt"
        if ckpt != kept:
            shutil.copyfile(ckpt, kept)
        store = self.work / "store"
        if store.exists():
            shutil.rmtree(store)
        ray_tmp = tempfile.mkdtemp(prefix="bref-ray-", dir="/tmp")
        try:
            _, stdout, seconds = self.ssjdn(
                "embed", ["embed", str(self.shards), str(store), "--checkpoint", str(kept), "--json", "--no-progress"],
                timeout=600, env={**self.env, "RAY_TMPDIR": ray_tmp},
            )  # fmt: skip
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        report = json.loads(stdout[stdout.index("{"):])
        keep = ("archive_kind", "units_total", "units_done_before", "units_embedded", "images", "captions", "bad",
                "failed_units", "changed_units")  # fmt: skip
        self.check("embed.report", {k: report.get(k) for k in keep},
                   info={"model_id": report.get("model_id"), "wall_s": seconds, "checkpoint": str(ckpt),
                         "checkpoint_sha256": sha256_file(kept)})  # fmt: skip
        self.check("embed.checkpoint_weights", self.weights("embed-checkpoint-weights", {"checkpoint": kept}))

        prefixes = {str(self.shards): "<shards>", str(store): "<store>"}

        def hits(doc: dict) -> dict[str, Any]:
            return {"mode": doc.get("mode"), "hits": [
                {"key": h.get("key"), "score": h.get("score"), "split": h.get("split"), "class": h.get("class"),
                 "source": relativize(h.get("source"), prefixes)} for h in doc.get("hits", [])]}  # fmt: skip

        def cli_query(mode: str, flags: list[str]) -> None:
            for i, text in enumerate(QUERY_TEXTS):
                _, out, secs = self.ssjdn(f"query-{mode}-{i}", ["query", text, "--store", str(store), "-k",
                                          str(QUERY_K), "--json", *flags], timeout=300)  # fmt: skip
                doc = json.loads(out[out.index("{"):])
                info = {"wall_s": secs, "seconds": doc.get("seconds")}
                if doc.get("ann"):
                    info["ann"] = doc["ann"]  # recall measured at build: varies with the (threaded) build
                self.check(f"query.{mode}.{i}", {"text": text, **hits(doc)}, tolerance=SCORE_TOLERANCE, info=info)

        cli_query("exact", [])
        cli_query("no_cache", ["--no-cache"])
        cli_query("ann", ["--ann"])
        # The ANN index is rebuilt from scratch once, to note whether its build is reproducible (info only).
        ann_dirs = [p for p in store.rglob("_ann") if p.is_dir()]
        if ann_dirs:
            for p in ann_dirs:
                shutil.rmtree(p)
            _, out, _ = self.ssjdn("query-ann-rebuilt-0", ["query", QUERY_TEXTS[0], "--store", str(store), "-k",
                                   str(QUERY_K), "--json", "--ann"], timeout=300)  # fmt: skip
            doc = json.loads(out[out.index("{"):])
            first = self.checks["query.ann.0"]
            first["info"]["rebuilt_same_hits"] = first_difference(
                first["value"], {"text": QUERY_TEXTS[0], **hits(doc)}, SCORE_TOLERANCE) is None
            first["info"]["rebuilt_recall"] = (doc.get("ann") or {}).get(f"recall@{QUERY_K}")
        else:
            self.checks["query.ann.0"]["info"]["rebuilt_same_hits"] = "no _ann folder found in the store to remove"
        # The matrix cache only starts by itself at 100k rows: forced through the Python API.
        docs = self.snippet("query-cache-api", CACHE_QUERY_SNIPPET,
                            [self.args.query_api, str(store), str(QUERY_K), json.dumps(list(QUERY_TEXTS))])  # fmt: skip
        for i, (text, doc) in enumerate(zip(QUERY_TEXTS, docs)):
            self.check(f"query.cache_forced.{i}", {"text": text, **hits(doc)}, tolerance=SCORE_TOLERANCE,
                       info={"via": f"{self.args.query_api}(..., cache=True)", "seconds": doc.get("seconds")})
        cli_query("exact_with_cache", [])  # the default CLI path once the cache exists (it loads it)

    def record_tiff(self) -> None:
        files = [str(self.data / "geotiff" / n) for n in ("RGBA.uint16.tif", "RGBA.byte.tif")]
        res = self.snippet("tiff", TIFF_SNIPPET, [self.args.decode_image, self.args.band_reader, *files])
        for name, r in res.items():
            via = {"decode_image": self.args.decode_image, "band_reader": self.args.band_reader}
            self.check(f"tiff.{name}.bands", r["bands"], info=via)
            self.check(f"tiff.{name}.rgb", r["rgb"], info=via)

    # -------------------------------------------------------------------------------------------- main

    def record(self) -> int:
        wanted = [s for s in SECTIONS if (not self.args.only or s in self.args.only) and s not in self.args.skip]
        if self.work.exists() and not (self.work / MARKER).exists():
            raise SystemExit(f"{self.work} exists and was not made by this script: choose another --out")
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / MARKER).write_text("made by benchmarks.behaviour_reference; deleted and rebuilt by it\n")
        self.ray_checkpoint: Path | None = None
        t0 = time.perf_counter()
        code = None
        try:
            code = self.snippet("code", CODE_SNIPPET, [], timeout=120)
        except StepError as exc:
            print(f"[record] could not locate the code under test: {exc}", file=sys.stderr)
        print(f"[record] code under test: {code}", flush=True)
        if "query" in wanted and "train_ray" not in wanted and not self.args.query_checkpoint:
            raise SystemExit("query needs the train_ray section or --query-checkpoint")
        if ("train_ray" in wanted or "query" in wanted) and "shard" not in wanted:
            raise SystemExit("train_ray and query use the shards: keep the shard section")
        for name in wanted:
            self.section(name, getattr(self, f"record_{name}"))
        total = round(time.perf_counter() - t0, 1)
        doc = {
            "format": "ssjdn-behaviour-reference/1",
            "meta": {
                "ssjdn": self.args.ssjdn, "argv": self.cli, "python": self.python, "code": code,
                "data": str(self.data), "sections": wanted, "repeat": self.args.repeat,
                "kill_resume": self.args.kill_resume, "query_checkpoint": self.args.query_checkpoint,
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": total, "step_wall_s": self.walls,
                "failures": self.failures,
            },
            "checks": self.checks,
        }  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".reference.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.out / "reference.json")
        print(f"[record] wrote {self.out / 'reference.json'}: {len(self.checks)} checks in {total:.0f}s"
              + (f"; FAILED sections: {', '.join(self.failures)}" if self.failures else ""), flush=True)  # fmt: skip
        return 1 if self.failures else 0


def compare(a_path: str, b_path: str, only_common: bool = False) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    ca, cb = a.get("checks", {}), b.get("checks", {})
    names = list(ca) + [n for n in cb if n not in ca]
    different = 0
    for name in names:
        if only_common and (name not in ca or name not in cb):
            print(f"skipped    {name}: only in {a_path if name in ca else b_path}")
            continue
        if name not in ca or name not in cb:
            print(f"different  {name}: only in {a_path if name in ca else b_path}")
            different += 1
            continue
        tol = max(float(ca[name].get("tolerance", 0.0)), float(cb[name].get("tolerance", 0.0)))
        diff = first_difference(ca[name]["value"], cb[name]["value"], tol)
        if diff is None:
            print(f"equal      {name}")
        else:
            print(f"different  {name}: {diff}")
            different += 1
    for label, doc in ((a_path, a), (b_path, b)):
        failures = doc.get("meta", {}).get("failures") or {}
        for section, msg in failures.items():
            print(f"different  record-failure:{section} in {label}: {msg.splitlines()[0] if msg else ''}")
            different += 1
    equal = sum(1 for n in names if n in ca and n in cb) - sum(
        first_difference(ca[n]["value"], cb[n]["value"], max(ca[n].get("tolerance", 0), cb[n].get("tolerance", 0)))
        is not None for n in names if n in ca and n in cb)  # fmt: skip
    print(f"{len(names)} checks: {equal} equal, {different} different")
    return 1 if different else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.behaviour_reference", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the references through the CLI into OUT/reference.json")
    rec.add_argument("--ssjdn", required=True, help='the CLI invocation, e.g. "ssjdn" or "python -m pipelines.cli"')
    rec.add_argument("--out", required=True, help="output folder (reference.json, work/, artifacts/)")
    rec.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                     help="folder with ucm-captions/ and geotiff/ (default ../shared/data of the repository)")
    rec.add_argument("--only", type=lambda s: s.split(","), default=[], help=f"sections, of {','.join(SECTIONS)}")
    rec.add_argument("--skip", type=lambda s: s.split(","), default=[], help="sections to leave out")
    rec.add_argument("--no-repeat", dest="repeat", action="store_false",
                     help="run train-local and Ray train once (no determinism check)")
    rec.add_argument("--no-kill-resume", dest="kill_resume", action="store_false",
                     help="skip the Ray run killed by fault injection and resumed")
    rec.add_argument("--kill-env", default=f"SSJDN_FAULT_KILL_AT_STEP={KILL_AT_STEP}",
                     help="NAME=VALUE that makes rank 1 SIGKILL itself once (old code: SSJDN_FAULT_KILL_AT_STEP)")
    rec.add_argument("--ray-timeout", type=float, default=600, help="seconds per Ray train run (600)")
    rec.add_argument("--query-checkpoint", default=None,
                     help="embed with this checkpoint instead of the first Ray run's best/checkpoint.pt")
    rec.add_argument("--query-api", default="pipelines.query:query_store",
                     help="MODULE:FUNCTION called with (store, text=, k=, cache=True) for the forced matrix cache")
    rec.add_argument("--decode-image", default="ssjdn.data.images:decode_image",
                     help="MODULE:FUNCTION(data, name) -> RGB PIL image")
    rec.add_argument("--band-reader", default="ssjdn.data.images.tiff_bands:decode_bands",
                     help="MODULE:FUNCTION(data) -> (height, width, bands) array")
    cmp_ = sub.add_parser("compare", help="compare two reference.json files; exit 1 on any difference")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.add_argument("--only-common", action="store_true",
                      help="skip checks recorded on one side only (partial records made with --only/--skip)")
    args = ap.parse_args(argv)
    if args.command == "compare":
        return compare(args.a, args.b, args.only_common)
    bad = [s for s in [*args.only, *args.skip] if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}: expected {', '.join(SECTIONS)}")
    return Recorder(args).record()


if __name__ == "__main__":
    sys.exit(main())
