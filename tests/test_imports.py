"""Start-up cost (tec_pipeline/_imports.py): importing timm and reading a model leave torch._dynamo unimported,
and what needs it later gets the real module."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
import sys
import tec_pipeline  # installs the import hooks
import timm  # torchvision (roi_align), timm.layers.typing, naflexvit's decorated methods
import torch
from tec_pipeline.models.base import read_encoder_checkpoint
from tec_pipeline.models.convert import convert_checkpoint
from tec_pipeline.models.vit import build_vit, resolve_arch

arch = resolve_arch("tec_pico_p4_16")
torch.save({"model": build_vit(arch).state_dict(), "arch": arch.to_dict(), "kind": "mae", "config": {},
            "version": "test"}, sys.argv[1] + "/base.pth")
encoder = read_encoder_checkpoint(sys.argv[1] + "/base.pth")  # meta-device builds inside
convert_checkpoint(sys.argv[1] + "/base.pth", sys.argv[1] + "/enc.safetensors")
print("dynamo after reading and converting:", "torch._dynamo" in sys.modules)

roi_align = sys.modules["torchvision.ops.roi_align"]
import torch._dynamo.utils as utils  # the real module, not the stand-in
assert utils.__file__.endswith("torch/_dynamo/utils.py"), utils
assert roi_align.is_compile_supported("cpu") == utils.is_compile_supported("cpu")
model = torch.nn.Linear(3, 3)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(2, 3)).sum().backward()
opt.step()
assert torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2)).tolist() == [2.0, 2.0]
from timm.layers.typing import disable_compiler
calls = []
f = disable_compiler(lambda x: calls.append(x) or x + 1)
assert torch.compile(lambda x: f(x) * 2, backend="eager")(torch.ones(1)).tolist() == [4.0] and len(calls) == 1
print("ok")
"""


def test_reading_and_converting_a_model_does_not_import_dynamo(tmp_path) -> None:
    env = {**os.environ, "TEC_EAGER_DYNAMO": "0"}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dynamo after reading and converting: False" in out and out.endswith("ok\n"), out

