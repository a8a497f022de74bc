"""Stage-1 compute: the base model over one task's decoded views, targets brought to their stored form.

The uint8 pixels cross to the device (4x fewer bytes than float32; non_blocking from pinned memory), are
normalised there, and targets are cast on the device to the dtype the codec stores when the codec stores a
plain float (fp16: half the bytes cross back and the host does no cast). Quantising codecs (int8, ecq) get
float32: their scales are rounded with numpy's float16 rules on the host, which keeps them bit-exact.
"""

from __future__ import annotations

import numpy as np
import torch

from tec_pipeline.data.views import normalize
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.stage1.config import autocast
from tec_pipeline.stage1.decode import TaskInputs
from tec_pipeline.store.codecs import Codec, FloatCodec, TensorCodec

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def device_dtype(part: TensorCodec) -> torch.dtype:
    """The dtype a target leaves the device in for codec part `part`."""
    return _TORCH_DTYPES[part.dtype] if isinstance(part, FloatCodec) else torch.float32


def _targets(model: torch.nn.Module, x: torch.Tensor, k: int, last_layers: int) -> dict[str, torch.Tensor]:
    # a stand-in base model (the host-path benchmark) brings its own targets; a timm ViT gets the shared ones
    own = getattr(model, "stored_targets", None)
    return own(x, k, last_layers) if callable(own) else stored_targets(model, x, k, last_layers)


def compute_task(model: torch.nn.Module, inputs: TaskInputs, k: int, last_layers: int, batch_size: int,
                 device: torch.device, amp: str = "none", codec: Codec | None = None) -> dict[str, np.ndarray]:
    """Targets of one task as numpy arrays, features normalised, invalid rows zero.

    Returns features [n,L,D] and attention [n,1+k,H,L] (float16 where `codec` stores float16, else float32),
    topk_index int64 [n,k], boxes int32 [n,5], valid bool [n].
    """
    dtypes = {"features": device_dtype(codec.features) if codec else torch.float32,
              "attention": device_dtype(codec.attention) if codec else torch.float32, "topk_index": torch.int64}
    pin = device.type == "cuda"
    outs: dict[str, torch.Tensor] = {}
    for start in range(0, len(inputs.pixels), batch_size):
        x = normalize(inputs.pixels[start:start + batch_size].to(device, non_blocking=True))
        with torch.no_grad(), autocast(amp, device):
            t = _targets(model, x, k, last_layers)
        for name, dtype in dtypes.items():
            if name not in outs:  # one host buffer per task: no per-batch arrays to concatenate
                shape = (len(inputs.pixels), *t[name].shape[1:])
                outs[name] = torch.empty(shape, dtype=dtype, pin_memory=pin)
            # cast on the device (fewer bytes cross), then one copy into the task's buffer (pinned: async)
            outs[name][start:start + len(x)].copy_(t[name].to(dtype), non_blocking=pin)
    if pin:
        torch.cuda.current_stream(device).synchronize()  # the async copies have landed before the writers read
    result = {name: value.numpy() for name, value in outs.items()}
    if not inputs.valid.all():  # undecodable images: rows of zeros (the model saw blank pixels)
        for value in result.values():
            value[~inputs.valid] = 0
    return {**result, "boxes": inputs.boxes, "valid": inputs.valid}
