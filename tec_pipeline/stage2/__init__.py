"""Stage 2's data side (`tec pretrain`): stored views and targets as loader items, and the run-long batch stream.

It sits above both `data/` (shards, views, the loader) and `store/` (the target store), which know nothing of
each other.
"""
