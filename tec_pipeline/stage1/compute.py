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


def compute_task(model: torch.nn.Module, inputs: TaskInputs, k: int, last_layers: int, batch_size: int,
                 device: torch.device, amp: str = "none", codec: Codec | None = None) -> dict[str, np.ndarray]:
    """Targets of one task as numpy arrays, features normalised, invalid rows zero.

    Returns features [n,L,D] and attention [n,1+k,H,L] (float16 where `codec` stores float16, else float32),
    topk_index int64 [n,k], boxes int32 [n,5], valid bool [n].
    """
    dtypes = {"features": device_dtype(codec.features) if codec else torch.float32,
              "attention": device_dtype(codec.attention) if codec else torch.float32, "topk_index": None}
    outs: dict[str, list[np.ndarray]] = {name: [] for name in dtypes}
    valid = torch.from_numpy(inputs.valid)
    for start in range(0, len(inputs.pixels), batch_size):
        x = normalize(inputs.pixels[start:start + batch_size].to(device, non_blocking=True))
        with torch.no_grad(), autocast(amp, device):
            t = stored_targets(model, x, k, last_layers)
        keep = valid[start:start + batch_size].to(device)
        for name, dtype in dtypes.items():
            value = t[name] if dtype is None else t[name].to(dtype)
            # zeroed on the device: the host then never copies a chunk to blank its invalid rows
            value = torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value, torch.zeros((), dtype=value.dtype,
                                                                                             device=device))
            outs[name].append(value.cpu().numpy())
    result = {name: np.concatenate(parts) for name, parts in outs.items()}
    return {**result, "boxes": inputs.boxes, "valid": inputs.valid}
