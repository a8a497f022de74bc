"""Stage-1 compute: the base model over one task's decoded views, targets brought to their stored form.

The uint8 pixels cross to the device (4x fewer bytes than float32; non_blocking from pinned memory), are
normalised there, and targets leave the device in stored form: cast to the dtype a float codec stores (fp16:
half the bytes cross back and the host does no cast), or quantised by the int8/ecq encoders' torch twins
(stage1/quantize.py: the same arrays bit for bit, ~4x fewer bytes than float32). The host only compresses and
writes.
"""

from __future__ import annotations

from typing import Any

import torch

from tec_pipeline.data.views import normalize
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.stage1.config import autocast
from tec_pipeline.stage1.decode import TaskInputs
from tec_pipeline.stage1.quantize import device_encode, encodes_on_device
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
                 device: torch.device, amp: str = "none", codec: Codec | None = None,
                 quantize: bool = True) -> dict[str, Any]:
    """Targets of one task as numpy arrays, features normalised, invalid rows zero.

    Returns features [n,L,D] and attention [n,1+k,H,L] (float16 where `codec` stores float16, else float32;
    where `codec` quantises and `quantize`, the part's stored arrays instead, a dict as `TensorCodec.encode`
    returns it; without `quantize` float32 for the host to encode),
    topk_index int64 [n,k], boxes int32 [n,5], valid bool [n]: what `TargetStore.write_task` takes.
    Raises ValueError where the codec's encoder would refuse the targets (NaN, inf, beyond float16).
    """
    parts = {"features": codec.features if codec else None, "attention": codec.attention if codec else None}
    pin = device.type == "cuda"
    refused = torch.zeros((), dtype=torch.bool, device=device)
    host: dict[tuple[str, str | None], torch.Tensor] = {}  # (target, encoded array or None) -> host buffer
    for start in range(0, len(inputs.pixels), batch_size):
        stop = min(start + batch_size, len(inputs.pixels))
        inputs.wait_rows(stop)  # the decode ring may still be filling later rows
        x = normalize(inputs.pixels[start:stop].to(device, non_blocking=True))
        batch_valid = inputs.valid[start:stop]
        invalid = None if batch_valid.all() else torch.from_numpy(~batch_valid).to(device)
        with torch.no_grad(), autocast(amp, device):
            t = _targets(model, x, k, last_layers)
        arrays: dict[tuple[str, str | None], torch.Tensor] = {("topk_index", None): t["topk_index"].to(torch.int64)}
        for name, part in parts.items():
            value = t[name]
            if invalid is not None:  # undecodable images: rows of zeros (the model saw blank pixels)
                value = value.masked_fill(invalid.view(-1, *[1] * (value.dim() - 1)), 0)
            if quantize and part is not None and encodes_on_device(part):  # here: ~4x fewer bytes cross
                encoded, bad = device_encode(part, value)
                refused |= bad
                arrays.update({(name, array): v for array, v in encoded.items()})
            else:  # cast on the device (fewer bytes cross), then one copy into the task's buffer
                arrays[(name, None)] = value.to(device_dtype(part) if part else torch.float32)
        for key, value in arrays.items():
            if key not in host:  # one host buffer per array and task: no per-batch arrays to concatenate
                host[key] = torch.empty((len(inputs.pixels), *value.shape[1:]), dtype=value.dtype, pin_memory=pin)
            host[key][start:start + len(x)].copy_(value, non_blocking=pin)  # pinned: asynchronous
    if pin:
        torch.cuda.current_stream(device).synchronize()  # the async copies have landed before the writers read
    if bool(refused):
        raise ValueError(f"the targets of {inputs.task} contain non-finite values (or values float16 cannot "
                         "hold); refusing to store them")
    result: dict[str, Any] = {"features": {}, "attention": {}}
    for (name, array), value in host.items():
        if array is None:
            result[name] = value.numpy()
        else:
            result[name][array] = value.numpy()
    valid = inputs.valid.copy()  # copies: the decode ring reuses its buffers once the task is computed
    if not valid.all():
        result["topk_index"][~valid] = 0
    return {**result, "boxes": inputs.boxes.copy(), "valid": valid}
