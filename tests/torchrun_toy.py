"""`torchrun -m tests.torchrun_toy RUN_DIR`: test_train_loop's linear toy on every rank, accum 2.

Micro-batch i of rank r is quarter 2·(i % 2) + r of the big batch i // 2, so an optimizer step of 2 ranks × 2
micro-batches sees the same 4 quarters as one process with accum 4 (tests/test_stage2_scale.py compares).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from tec_pipeline.train.distributed import init_distributed
from tec_pipeline.train.loop import LoopConfig, run_training
from tests.test_train_loop import Linear, _quarters

QUARTER = 3
TOY_LOOP = {"epochs": 2, "batch_size": QUARTER, "blr": 10.0, "warmup_epochs": 0.5, "save_every": 0}


def main() -> None:
    torch.set_num_threads(1)
    rank, world = init_distributed("cpu")
    assert world == 2

    def batches(epoch: int, start: int):
        for i in range(start, 6):
            yield _quarters(epoch, i // 2, QUARTER)[2 * (i % 2) + rank]

    try:
        run_training(Linear(), batches, 6, LoopConfig(accum=2, **TOY_LOOP), sys.argv[1])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
