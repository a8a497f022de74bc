"""Stage 1 (`tec cache-targets`): plan, decode, compute, write and the executors that run them.

`store/` holds the Zarr contract only; this package is the orchestration that fills a store.
"""

from tec_pipeline.stage1.config import CacheConfig
from tec_pipeline.stage1.run import cache_targets

__all__ = ["CacheConfig", "cache_targets"]
