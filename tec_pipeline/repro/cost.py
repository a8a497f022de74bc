"""What caching saves, counted in FLOPs of the real models, and extrapolated to ImageNet ViT-B.

An online TEC step runs the base model (a forward over the full view) and the student (forward on the visible
patches, decoder, prediction heads, backward). A cached step runs only the student; the base model ran once per
stored view, in stage 1. With F_t the base model's forward FLOPs per image and F_s the student step's FLOPs per
image (forward + backward), the base model's share of an online step is

    f = F_t / (F_t + F_s)

and for N images, E student epochs and V stored views

    online  = E · N · (F_t + F_s)
    cached  = V · N · F_t  +  E · N · F_s          saving = (E − V) · N · F_t.

Both F are counted with torch's FlopCounterMode on the models this project trains (matmuls, convolutions and
attention; the optimiser's elementwise work is left out, it is a small share at ViT sizes). The FLOP share is
checked against the CPU seconds `make study` measures at its own sizes (cached vs online training of the same
student), so the model of cost is tested where it can be. GPU-hours need a sustained FLOP rate, which no
measurement here gives (no GPU was lent): `GPU_FLOPS` is an assumption, stated wherever it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# one H200: 989 dense bf16 TFLOP/s peak; 40 % of it is a typical sustained rate for ViT-B training (assumption)
GPU_NAME, GPU_PEAK_FLOPS, GPU_UTILISATION = "H200", 989e12, 0.40
GPU_FLOPS = GPU_PEAK_FLOPS * GPU_UTILISATION
IMAGENET_TRAIN = 1_281_167


@dataclass(frozen=True)
class StepFlops:
    arch: str
    teacher_forward: float  # FLOPs per image of the base model's target forward
    student_step: float  # FLOPs per image of a student training step (forward + backward)

    @property
    def teacher_share(self) -> float:
        return self.teacher_forward / (self.teacher_forward + self.student_step)


def count_step_flops(arch_name: str, k: int = 15, batch: int = 2, mask_ratio: float = 0.75) -> StepFlops:
    """FLOPs per image of `arch_name` as base model (targets) and as student (a TEC step), same architecture."""
    from torch.utils.flop_counter import FlopCounterMode

    from tec_pipeline.models.student import TECStudent
    from tec_pipeline.models.targets import stored_targets
    from tec_pipeline.models.vit import build_vit, resolve_arch

    arch = resolve_arch(arch_name)
    torch.manual_seed(0)
    teacher = build_vit(arch).eval()
    student = TECStudent(arch, k=k, mask_ratio=mask_ratio, pred_dim=arch.embed_dim, pred_heads=arch.num_heads)
    x = torch.randn(batch, 3, arch.img_size, arch.img_size)
    with FlopCounterMode(display=False) as teacher_count:
        targets = stored_targets(teacher, x, k)
    with FlopCounterMode(display=False) as student_count:
        student(x, targets)["loss"].backward()
    return StepFlops(arch_name, teacher_count.get_total_flops() / batch, student_count.get_total_flops() / batch)


def extrapolate(flops: StepFlops, epochs: int, views: int, images: int = IMAGENET_TRAIN) -> dict[str, Any]:
    """GPU-hours of online and cached TEC training (the formulas of the module docstring) at GPU_FLOPS."""
    online = epochs * images * (flops.teacher_forward + flops.student_step)
    cache = views * images * flops.teacher_forward
    student = epochs * images * flops.student_step
    hours = 1 / GPU_FLOPS / 3600
    return {"arch": flops.arch, "epochs": epochs, "views": views, "images": images,
            "teacher_share": flops.teacher_share, "online_gpu_hours": online * hours,
            "cache_gpu_hours": cache * hours, "cached_student_gpu_hours": student * hours,
            "cached_total_gpu_hours": (cache + student) * hours, "saving": 1 - (cache + student) / online,
            "gpu": f"{GPU_NAME} at {GPU_UTILISATION:.0%} of {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s (assumed)"}
