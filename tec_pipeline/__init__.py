"""tec-pipeline: TEC pretraining as a two-stage offline target-caching pipeline."""

__version__ = "0.1.0"
