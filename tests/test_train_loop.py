"""The shared training loop: optimizer groups, lr schedule, exact resume, atomic checkpoints, NaN stop, accum."""

from __future__ import annotations

import csv
import errno
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tec_pipeline.errors import UserError
from tec_pipeline.train import checkpoint as ckpt_io
from tec_pipeline.train.loop import LoopConfig, NonFiniteLossError, run_training
from tec_pipeline.train.optim import weight_decay_groups
from tec_pipeline.train.schedule import absolute_lr, effective_batch, lr_at, lr_at_step
from tests.conftest import free_port


class Toy(nn.Module):
    """Linear → LayerNorm → dropout, plus a 3-D token: exercises decay groups and the RNG restore."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.drop = nn.Dropout(0.3)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"] + self.token[0]
        pred = self.drop(self.norm(self.fc(x)))
        loss_a = (pred - batch["y"]).pow(2).mean()
        loss_b = 0.1 * torch.rand(()) * self.token.pow(2).sum()  # global-RNG draw inside the step
        return {"loss": loss_a + loss_b, "loss_a": loss_a, "loss_b": loss_b}


def toy_batches(epoch: int, start: int, n: int = 5, bs: int = 4):
    for i in range(start, n):
        g = torch.Generator().manual_seed(1000 * epoch + i)
        yield {"x": torch.randn(bs, 4, generator=g), "y": torch.randn(bs, 4, generator=g)}


def loop_cfg(**kw) -> LoopConfig:
    base = dict(epochs=3, batch_size=4, accum=2, blr=0.5, warmup_epochs=1.0, save_every=2, seed=3,
                deterministic=True)
    return LoopConfig(**{**base, **kw})


def fresh_toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


class Interrupt(Exception):
    pass


def interrupting_step(after: int):
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] > after:
            raise Interrupt
        return model(batch)

    return step


def test_weight_decay_groups_follow_timm_semantics():
    model = Toy()
    groups = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_decay[0.05] == {"token", "fc.weight"}  # the 3-D token IS decayed, as in the reference
    assert by_decay[0.0] == {"fc.bias", "norm.weight", "norm.bias"}  # frozen params are left out


def test_lr_schedule_values():
    lr, min_lr = absolute_lr(1.5e-4, effective_batch(256, 2, 8)), 1e-6
    assert lr == pytest.approx(2.4e-3)
    assert lr_at(0.0, lr, min_lr, 40, 100) == 0.0  # warm-up starts at 0, as in MAE
    assert lr_at(20.0, lr, min_lr, 40, 100) == pytest.approx(lr / 2)
    assert lr_at(40.0, lr, min_lr, 40, 100) == pytest.approx(lr)  # end of warm-up: the peak
    assert lr_at(70.0, lr, min_lr, 40, 100) == pytest.approx((lr + min_lr) / 2)  # half-way down the cosine
    assert lr_at(100.0, lr, min_lr, 40, 100) == pytest.approx(min_lr)
    # per optimizer step, with a fractional warm-up of 0.5 epochs at 10 steps per epoch
    assert lr_at_step(5, 10, lr, 0.0, 0.5, 2) == pytest.approx(lr)
    assert lr_at_step(2, 10, lr, 0.0, 0.5, 2) == pytest.approx(lr * 0.4)


def _metric_losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    full = fresh_toy()
    run_training(full, toy_batches, 5, loop_cfg(), tmp_path / "full")
    part = fresh_toy()
    # micro-batch 9 is inside epoch 1 (5 per epoch), after the mid-epoch save at optimizer step 4
    with pytest.raises(Interrupt):
        run_training(part, toy_batches, 5, loop_cfg(), tmp_path / "part", step_fn=interrupting_step(8))
    assert torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=True)["data_position"]["batch"] == 2
    resumed = fresh_toy()  # a new process would start from a fresh model too
    result = run_training(resumed, toy_batches, 5, loop_cfg(), tmp_path / "part")
    assert result.resumed_from == {"epoch": 1, "batch": 2}
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _metric_losses(tmp_path / "full") == _metric_losses(tmp_path / "part")


def test_checkpoint_loads_with_weights_only_and_keeps_last_epochs(tmp_path):
    run_training(fresh_toy(), toy_batches, 5, loop_cfg(), tmp_path, checkpoint_extra={"kind": "toy"})
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "schedule", "data_position", "rng", "config", "version", "kind"} <= set(ck)
    assert ck["data_position"]["epoch"] == 3 and ck["data_position"]["batch"] == 0
    assert ck["schedule"]["step"] == 9  # 3 epochs × ceil(5 / 2) optimizer steps
    assert ck["config"]["accum"] == 2 and isinstance(ck["rng"][0]["python"], list)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-2.pth"]
    assert (tmp_path / "config.yaml").is_file()


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    with pytest.raises(Interrupt):  # killed in epoch 1, after the epoch-0 checkpoint
        run_training(fresh_toy(), toy_batches, 5, loop_cfg(epochs=2, save_every=0), tmp_path,
                     step_fn=interrupting_step(5))
    before = (tmp_path / "checkpoint.pth").read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*checkpoint\.pth: No space left on device "
                                        r"\(errno 28\); the previous checkpoint\.pth is intact"):
        run_training(fresh_toy(), toy_batches, 5, loop_cfg(epochs=2, save_every=0), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert ckpt_io.load_checkpoint(tmp_path / "checkpoint.pth")["data_position"]["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_step(model, batch):
        calls["n"] += 1
        out = model(batch)
        if calls["n"] == 7:  # epoch 1, micro-batch 1: after the epoch-0 checkpoint
            out["loss"] = out["loss"] * float("nan")
        return out

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1 step 3; last good checkpoint: .*checkpoint\.pth"):
        run_training(fresh_toy(), toy_batches, 5, loop_cfg(), tmp_path, step_fn=nan_step)
    ck = ckpt_io.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck["data_position"] == {"epoch": 1, "batch": 0, "micro_batches_per_epoch": 5, "world_size": 1}
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": (self.fc(batch["x"]) - batch["y"]).pow(2).mean()}


def big_batch(epoch: int, i: int, bs: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * epoch + i)
    return {"x": torch.randn(bs, 6, generator=g), "y": torch.randn(bs, 3, generator=g)}


def test_accumulation_equals_larger_batch(tmp_path):
    b = 4

    def halves(epoch, start):
        for i in range(start, 6):
            big = big_batch(epoch, i // 2, 2 * b)
            yield {k: v[(i % 2) * b:(i % 2 + 1) * b] for k, v in big.items()}

    cfg = dict(epochs=2, blr=10.0, warmup_epochs=0.5, seed=0, save_every=0)
    accumulated, single = Linear(), Linear()
    run_training(accumulated, halves, 6, LoopConfig(batch_size=b, accum=2, **cfg), tmp_path / "a")
    run_training(single, lambda e, s: (big_batch(e, i, 2 * b) for i in range(s, 3)), 3,
                 LoopConfig(batch_size=2 * b, accum=1, **cfg), tmp_path / "b")
    assert not torch.equal(accumulated.fc.weight, Linear().fc.weight)  # it did train
    for a, s in zip(accumulated.parameters(), single.parameters(), strict=True):
        assert torch.allclose(a, s, atol=1e-6, rtol=0)
    assert math.isclose(absolute_lr(10.0, effective_batch(b, 2, 1)), absolute_lr(10.0, effective_batch(2 * b, 1, 1)))


def _quarters(epoch: int, step: int, b: int) -> list[dict[str, torch.Tensor]]:
    big = big_batch(epoch, step, 4 * b)
    return [{k: v[q * b:(q + 1) * b] for k, v in big.items()} for q in range(4)]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, b: int) -> None:
    import os

    import torch.distributed as dist

    from tec_pipeline.train.distributed import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert init_distributed() == (rank, world)

    def batches(epoch, start):  # micro-batch i of rank r: quarter 2·(i % 2) + r of big batch i // 2
        for i in range(start, 6):
            yield _quarters(epoch, i // 2, b)[2 * (i % 2) + rank]

    try:
        run_training(Linear(), batches, 6, LoopConfig(epochs=2, batch_size=b, accum=2, blr=10.0, warmup_epochs=0.5,
                                                      save_every=0), run_dir)
    finally:
        dist.destroy_process_group()


def test_ddp_with_accumulation_equals_one_process(tmp_path):
    """2 gloo ranks × accum 2 (no_sync on the first micro-batch) = 1 process × accum 4, same 4 quarters."""
    import torch.multiprocessing as mp

    b = 3
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), b), nprocs=2, join=True)
    single = Linear()
    run_training(single, lambda e, s: (_quarters(e, i // 4, b)[i % 4] for i in range(s, 12)), 12,
                 LoopConfig(epochs=2, batch_size=b, accum=4, blr=10.0, warmup_epochs=0.5, save_every=0),
                 tmp_path / "single")
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert len(ddp["rng"]) == 2 and ddp["data_position"]["world_size"] == 2
    for name, value in single.state_dict().items():
        assert torch.allclose(ddp["model"][name], value, atol=1e-6, rtol=0), name


def test_non_finite_loss_between_log_steps_is_seen_late_but_never_checkpointed(tmp_path):
    calls = {"n": 0}

    def nan_step(model, batch):
        calls["n"] += 1
        out = model(batch)
        if calls["n"] == 9:  # epoch 1, optimizer step 4 (0-based): two steps after the epoch-0 checkpoint
            out["loss"] = out["loss"] * float("nan")
        return out

    # no row before the epoch's end: the NaN is seen one optimizer step later, before the epoch-end save
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1 step 4; last good"):
        run_training(fresh_toy(), toy_batches, 5, loop_cfg(save_every=0, log_every=10), tmp_path, step_fn=nan_step)
    assert calls["n"] == 10  # the rest of the epoch ran, no further
    ck = ckpt_io.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck["data_position"]["epoch"] == 1 and ck["data_position"]["batch"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert [step for step, _ in _metric_losses(tmp_path)] == ["3"]  # one row for epoch 0's three steps


def test_log_every_averages_rows_and_a_save_forces_one(tmp_path):
    run_training(fresh_toy(), toy_batches, 5, loop_cfg(log_every=1, save_every=0), tmp_path / "each")
    run_training(fresh_toy(), toy_batches, 5, loop_cfg(log_every=2, save_every=3), tmp_path / "pairs")
    each = [float(loss) for _, loss in _metric_losses(tmp_path / "each")]
    rows = _metric_losses(tmp_path / "pairs")
    # steps 1-2 | 3 (epoch end) | 4 | 5-6 (save at 6 is an epoch end) | 7-8 | 9 (epoch end)
    assert [step for step, _ in rows] == ["2", "3", "4", "6", "8", "9"]
    spans = [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 9)]
    for (_, loss), (a, b) in zip(rows, spans, strict=True):
        assert float(loss) == pytest.approx(sum(each[a:b]) / (b - a), rel=1e-6)


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused(tmp_path):
    model = fresh_toy()
    run_training(model, toy_batches, 5, loop_cfg(amp="bf16", epochs=1), tmp_path / "bf16")
    assert not torch.equal(model.fc.weight, fresh_toy().fc.weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
        run_training(fresh_toy(), toy_batches, 5, loop_cfg(amp="fp16", device="cpu"), tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()


def test_process_group_backend_follows_the_device():
    from tec_pipeline.train.distributed import backend_for

    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
