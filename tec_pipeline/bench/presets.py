"""Benchmark presets: model, data and sizes for `tec bench --preset tiny|small|base`.

The base model and the student share one architecture (TEC predicts the base model's targets at its width).
`tiny` runs in well under a minute on two CPU cores; `small` is the deeper Fashion-MNIST model; `base` is the
ImageNet-sized ViT-B/16 on a few hundred photos, meant for a GPU (it runs on a CPU, slowly).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tec_pipeline.data.loader import DEFAULT_SHUFFLE_BUFFER
from tec_pipeline.errors import UserError


@dataclass(frozen=True)
class BenchPreset:
    """Sizes of one benchmark run.

    images: rows of the stage-2 store (the memory figure adds a store `memory_factor` times larger); batch:
    stage-1 and stage-2 batch size; epochs: stage-2 epochs timed per run, after one untimed warm-up epoch
    (whole epochs, so each epoch's loader start is counted once per epoch as in real training); reps: runs of
    every compared configuration (the median is reported); attention_batches: batch sizes of the row-sparse vs
    full attention timing; loader_workers: stage-1 decode processes and stage-2 loader workers.
    """

    name: str
    arch: str
    source: str  # "fashion-mnist" (generated images when it is not installed) or "photos"
    images: int
    batch: int
    epochs: int
    reps: int
    views: int = 2
    topk: int = 15
    last_layers: int = 2
    chunk_rows: int = 256
    loader_workers: int = 1
    memory_factor: int = 10
    memory_reps: int = 1  # peak RSS varies little between identical runs; each one is a whole epoch
    attention_batches: tuple[int, ...] = (8, 64)
    masks: tuple[int, ...] = (1, 2, 4)
    quick_arch: str | None = None  # a cheaper model for --quick (None: the same)
    host_path_images: int = 256  # ImageNet-sized JPEGs of the host-path cost (stand-in ViT-B, every preset)
    # loader-worker memory at ViT-B shapes (bench/workers.py), the same for every preset: rows of the smaller
    # store (its 10x is the larger), loader workers, shuffle buffer and chunk rows (the defaults of stages 1, 2)
    worker_rows: int = 1024
    worker_loaders: int = 1
    worker_buffer: int = DEFAULT_SHUFFLE_BUFFER
    worker_chunk_rows: int = 256

    def quick(self) -> BenchPreset:
        """Every comparison at the smallest sizes that still time a whole epoch: checks that everything runs.

        Its figures are not meant to be quoted (one repetition, 4-step epochs, a 4x store for memory).
        """
        batch = min(self.batch, 32)
        return dataclasses.replace(self, name=f"{self.name}-quick", arch=self.quick_arch or self.arch,
                                   images=4 * batch, batch=batch, epochs=1, reps=1, chunk_rows=2 * batch,
                                   memory_factor=4, memory_reps=1, attention_batches=self.attention_batches[:1],
                                   host_path_images=32, worker_rows=64, worker_buffer=16, worker_chunk_rows=32)


PRESETS: dict[str, BenchPreset] = {
    p.name: p
    for p in (
        BenchPreset("tiny", "tec_micro_p4_28", "fashion-mnist", images=512, batch=64, epochs=1, reps=3,
                    quick_arch="tec_pico_p4_16"),
        BenchPreset("small", "tec_tiny_p4_28", "fashion-mnist", images=512, batch=64, epochs=1, reps=3),
        BenchPreset("base", "vit_base_patch16_224", "photos", images=512, batch=64, epochs=2, reps=3,
                    chunk_rows=128, loader_workers=6, attention_batches=(8, 64)),
    )
}


def get_preset(name: str, quick: bool = False) -> BenchPreset:
    """The preset called `name` (quick-sized when asked); UserError listing the choices otherwise."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return preset.quick() if quick else preset
