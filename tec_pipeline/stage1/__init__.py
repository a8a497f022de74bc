"""Stage 1 (`tec cache-targets`): the orchestration that fills a target store (moved out of store/)."""
