"""Engine: checkpoint round trip, safe loading, NaN guard, LR schedule, evaluation, local training end to end."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from ssjdn.batching import BadItem, collate
from ssjdn.config import load_config
from ssjdn.data.errors import DataError
from ssjdn.engine import (
    EpochLog,
    EvalSet,
    NonFiniteLossError,
    StepSums,
    TooManyBadSamples,
    apply_checkpoint,
    build_optimizer_and_scheduler,
    check_bad_samples,
    evaluate,
    load_checkpoint,
    restore_model,
    save_checkpoint,
    seed_everything,
    train_step,
)
from ssjdn.metrics import retrieval_metrics
from ssjdn.model import build_model
from ssjdn.tokenization import build_tokenizer
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)

CAPTIONS = [f"a {c} scene with {n} houses" for c in ("red", "green") for n in ("one", "two", "three", "four")]


def _setup(**overrides):
    seed_everything(0)
    cfg = load_config("tiny", overrides)
    tok = build_tokenizer(cfg, captions=CAPTIONS)
    model = build_model(cfg, tok)
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, 64, 64, generator=g), c, i % 4, f"k{i}") for i, c in enumerate(CAPTIONS)]
    return cfg, tok, model, collate(items, tok)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_round_trip_is_exact(tmp_path):
    cfg, tok, model, batch = _setup()
    opt, sched = build_optimizer_and_scheduler(model, cfg, total_steps=10)
    for _ in range(2):
        train_step(model, batch, opt, sched, grad_clip=1.0)
    path = tmp_path / "ck" / "c.pt"
    save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        step=2,
        epoch=1,
        tokenizer=tok,
        extra={"data_position": [1, 2]},
    )
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp files left behind

    restored, tok2, cfg2 = restore_model(path)
    assert cfg2 == model.cfg and tok2.state_dict() == tok.state_dict()
    model.eval()
    with torch.no_grad():
        assert torch.equal(restored.encode_image(batch["pixels"]), model.encode_image(batch["pixels"]))
        assert torch.equal(restored.encode_text(tok2(CAPTIONS)), model.encode_text(batch["tokens"]))

    # optimizer + scheduler state: one more step from the original and from the restored copy agree exactly
    ckpt = load_checkpoint(path)
    assert ckpt["extra"] == {"data_position": [1, 2]} and ckpt["epoch"] == 1
    opt2, sched2 = build_optimizer_and_scheduler(restored, cfg2, total_steps=10)
    assert apply_checkpoint(ckpt, restored, opt2, sched2) == (2, 1)
    torch.manual_seed(5)
    a = train_step(model, batch, opt, sched, grad_clip=1.0)
    torch.manual_seed(5)
    b = train_step(restored, batch, opt2, sched2, grad_clip=1.0)
    assert a == b
    for k, v in model.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k

    buf = io.BytesIO()
    save_checkpoint(buf, model=model, tokenizer=tok)
    assert restore_model(buf.getvalue())[0].state_dict().keys() == model.state_dict().keys()


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ssjdn-checkpoint/1", "payload": Evil()}, path)
    with pytest.raises(DataError, match="refused, it holds objects other than tensors") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "GLOBAL" in str(info.value)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an SSJDN checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_checkpoint_is_found_in_run_and_checkpoint_folders(tmp_path):
    """`--checkpoint` takes the `.pt` file, a Ray checkpoint folder, `best/`, a Ray or train-local run folder."""
    from pipelines.encoders import CheckpointError, read_checkpoint

    ray_run = tmp_path / "ray-run"
    for name in ("checkpoint-e0001-s0000032", "checkpoint-e0002-s0000064", "best"):
        (ray_run / name).mkdir(parents=True)
        (ray_run / name / "checkpoint.pt").write_bytes(name.encode())
    local_run = tmp_path / "local-run"
    local_run.mkdir()
    (local_run / "best.pt").write_bytes(b"best.pt")
    (local_run / "last.pt").write_bytes(b"last.pt")
    no_best = tmp_path / "no-best"
    for name in ("checkpoint-e0001-s0000032", "checkpoint-e0002-s0000064"):
        (no_best / name).mkdir(parents=True)
        (no_best / name / "checkpoint.pt").write_bytes(name.encode())
    expect = {
        ray_run / "checkpoint-e0001-s0000032": b"checkpoint-e0001-s0000032",
        ray_run / "best": b"best",
        ray_run: b"best",
        ray_run / "best" / "checkpoint.pt": b"best",
        local_run: b"best.pt",
        no_best: b"checkpoint-e0002-s0000064",
    }
    for url, data in expect.items():
        assert read_checkpoint(str(url)).data == data, url
    assert read_checkpoint(str(local_run)).url.endswith("best.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty holds no checkpoint"):
        read_checkpoint(str(tmp_path / "empty"))


def test_nan_loss_stops_before_the_weights_change():
    cfg, tok, model, batch = _setup()
    opt, sched = build_optimizer_and_scheduler(model, cfg, total_steps=10)
    before = _params(model)
    batch["pixels"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train_step(model, batch, opt, sched)
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k
    )


def test_lr_schedule_warmup_cosine_and_groups():
    cfg, tok, model, batch = _setup(**{"optim.schedule": "cosine", "optim.warmup_steps": 4, "optim.lr": 1e-3})
    opt, sched = build_optimizer_and_scheduler(model, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[12] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert {g["name"] for g in opt.param_groups} == {"backbone", "head"}  # GRU text: no pretrained group
    cfg, _, model, _ = _setup(
        **{
            "optim.schedule": "step",
            "optim.step_epochs": 1,
            "optim.step_gamma": 0.5,
            "optim.warmup_steps": 0,
            "optim.warmup_fraction": 0.0,
            "train.epochs": 4,
        }
    )
    opt, sched = build_optimizer_and_scheduler(model, cfg, total_steps=8)  # 2 steps per epoch
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"] / cfg.optim.lr)
        opt.step()
        sched.step()
    assert seen == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


def test_evaluate_matches_metrics_on_embeddings():
    cfg, tok, model, batch = _setup()
    records = [
        (k, batch["pixels"][i], [CAPTIONS[i], CAPTIONS[(i + 1) % 8]], i % 4)
        for i, k in enumerate(batch["keys"])
    ]
    es = EvalSet.from_records(records, batch_size=3)
    assert [len(k) for k, _ in es.image_batches] == [3, 3, 2] and len(es.captions) == 16
    got = evaluate(model, tok, es)
    assert model.training  # evaluate restores the mode it found
    model.eval()
    with torch.no_grad():
        img = model.encode_image(batch["pixels"])
        txt = model.encode_text(tok([c for c, _ in es.captions]))
    want = retrieval_metrics(img @ txt.T, [i for _, i in es.captions], [i % 4 for i in range(8)])
    for k, v in want.items():
        assert got[k] == pytest.approx(v)
    assert "cls_mr" in got


def test_epoch_log_keeps_the_best_by_val_and_survives_a_checkpoint():
    log = EpochLog()
    assert log.needs_untrained
    log.add_untrained({"val": {"mr": 5.0}, "test": {"mr": 9.0}}, eval_s=1.234)
    assert log.rows == [{"epoch": 0, "step": 0, "val": {"mr": 5.0}, "test": {"mr": 9.0}, "eval_s": 1.23}]
    assert not log.needs_untrained and log.best_mr == -math.inf  # epoch 0 is never "the best checkpoint"
    assert log.add_epoch({"epoch": 1, "val": {"mr": 20.0}, "test": {"mr": 99.0}})
    assert not log.add_epoch(
        {"epoch": 2, "val": {"mr": 19.0}, "test": {"mr": 100.0}}
    )  # val decides, not test
    assert log.add_epoch({"epoch": 3, "test": {"mr": 21.0}})  # no val split: test decides
    log.bad_total = 3
    again = EpochLog.from_state(json.loads(json.dumps(log.state())))
    assert again == log and EpochLog.from_state(None) == EpochLog()


def test_step_sums_mean_over_ranks_and_the_bad_sample_budget():
    a, b = StepSums(), StepSums({"loss": 1.0}, steps=1)
    a.add({"loss": 2.0, "lr": 0.1})
    a.add({"loss": 4.0, "lr": 0.1})
    assert StepSums.mean_of([a]) == {"loss": 3.0, "lr": 0.1}
    assert StepSums.mean_of([a, b]) == {"loss": 7.0 / 3, "lr": 0.2 / 3}  # over all steps of all ranks
    assert StepSums.mean_of([]) == {}
    bad = [BadItem(f"k{i}", "s3://b/shard.tar", "no json") for i in range(2)]
    check_bad_samples(bad, 198, 0.01, epoch=1)  # 2 of 200: at the limit
    check_bad_samples(bad, 10, None, epoch=1)  # no limit
    with pytest.raises(TooManyBadSamples, match=r"epoch 2: 2 bad of 100 samples \(limit 1.00%\): k0 \(s3://"):
        check_bad_samples(bad, 98, 0.01, epoch=2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from ssjdn.data.synthetic import generate_synthetic

    return generate_synthetic(
        tmp_path_factory.mktemp("syn"),
        n_per_class=8,
        seed=0,
        size=64,
        classes=["forest", "lake", "airport", "residential"],
    )


def test_train_local_writes_metrics_checkpoints_and_resumes(synthetic, tmp_path):
    from ssjdn.data.readers import load_dataset
    from ssjdn_cli.main import main

    bad = Path(load_dataset(synthetic).by_split("train")[0].source)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated JPEG: skipped and reported, not fatal
    try:
        out = tmp_path / "run"
        args = [
            "train-local",
            "--config",
            "tiny",
            "--data",
            str(synthetic),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--set",
            "model.lsd_cfg.num_classes=0",
            "--no-progress",
        ]
        assert main(args) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1, 2]
        assert {"val", "test"} <= set(rows[1]) and "loss" in rows[1]["train"] and "mr" in rows[2]["val"]
        assert (out / "best.pt").exists() and (out / "last.pt").exists()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["bad_samples"] >= 1
        assert bad.stem in (out / "bad_samples.jsonl").read_text()
        assert load_checkpoint(out / "best.pt")["config"]["model"]["lsd_cfg"]["num_classes"] == 4

        assert main([*args[:-3], "--epochs", "3", "--resume", "--no-progress"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
        last = load_checkpoint(out / "last.pt")
        assert last["epoch"] == 3 and [r["epoch"] for r in last["extra"]["history"]] == [0, 1, 2, 3]

        # the bad-sample budget of the Ray workers, here too: 1 unreadable train image is too many at 1%
        assert main([*args[:6], str(tmp_path / "strict"), "--max-bad-fraction", "0.01", *args[7:]]) == 1
    finally:
        bad.write_bytes(good)


@pytest.mark.integration
def test_train_local_reads_real_ucm(ucm_dir, tmp_path):
    from ssjdn.train_local import train_local

    cfg = load_config("tiny", {"model.lsd_cfg.num_classes": 0, "train.batch_size": 16})
    summary = train_local(
        cfg, ucm_dir, tmp_path, epochs=1, max_steps_per_epoch=2, device="cpu", progress=False
    )
    assert (
        summary["untrained"]["test"]["n_images"] == 210 and summary["untrained"]["test"]["n_captions"] == 1050
    )
    assert summary["best"]["val"]["n_images"] == 110
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["config"]["model"]["lsd_cfg"]["num_classes"] == 21 and ckpt["step"] == 2
