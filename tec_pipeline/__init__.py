"""tec-pipeline: TEC pretraining as a two-stage offline target-caching pipeline."""

from tec_pipeline import _imports

__version__ = "0.1.0"

_imports.install()  # timm's torchvision import without torch._dynamo (~3 CPU s of each process's start)
