"""Start-up cost: timm without torch._dynamo.

Importing timm loads torch._dynamo (with sympy, torch.fx's symbolic shapes, torch.distributed.tensor): about
3 CPU seconds of every process that imports timm, on top of torch's own 3.5, and every `tec` command but
make-shards and report imports timm. Two imports at module level do it, both for code this project never runs:

- torchvision/ops/roi_align.py (timm imports torchvision for FrozenBatchNorm2d) runs
  `from torch._dynamo.utils import is_compile_supported`, a function roi_align calls only when it runs;
- timm/layers/typing.py binds `disable_compiler = torch.compiler.disable`, which imports torch._dynamo as soon
  as it decorates something, and timm/models/naflexvit.py decorates methods with it at class definition.

While roi_align is imported, and only then, a stand-in module answers that one import with a function that
imports the real one when called (the stand-in is out of sys.modules again before roi_align's import returns);
timm's `disable_compiler` becomes a decorator that applies torch.compiler.disable on the decorated function's
first call. torch._dynamo is then imported by what needs it and is the real module: an optimizer step imports
it (commands that train still pay for it), commands that only run models (`tec convert`, `tec cache-targets`,
inspect, verify) no longer do. Standard library only; installed by tec_pipeline/__init__.py. TEC_EAGER_DYNAMO=1
turns it off (tests/test_imports.py checks both the saving and the real module afterwards).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable
from typing import Any

_ROI_ALIGN = "torchvision.ops.roi_align"
_TIMM_TYPING = "timm.layers.typing"
_DYNAMO = "torch._dynamo"
_DYNAMO_UTILS = "torch._dynamo.utils"


def is_compile_supported(device_type: Any) -> Any:
    """torch._dynamo.utils.is_compile_supported, imported on the first call."""
    from torch._dynamo.utils import is_compile_supported as real

    return real(device_type)


def lazy_disable_compiler(fn: Callable[..., Any] | None = None, recursive: bool = True, *,
                          reason: str | None = None) -> Any:
    """torch.compiler.disable(fn, recursive, reason=reason), applied when `fn` is first called."""
    import torch

    if fn is None:  # the context-manager / argument-first forms are rare: no deferral for them
        return torch.compiler.disable(fn, recursive, reason=reason)
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disabled.append(torch.compiler.disable(fn, recursive, reason=reason))
        return disabled[0](*args, **kwargs)

    return call


class _Hooked(importlib.abc.Loader):
    """A module's own loader, with `around(module, exec)` running its execution."""

    def __init__(self, loader: importlib.abc.Loader, around: Callable[[types.ModuleType, Callable[[], None]], None]):
        self._loader = loader
        self._around = around

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._around(module, lambda: self._loader.exec_module(module))


def _roi_align(module: types.ModuleType, execute: Callable[[], None]) -> None:
    if _DYNAMO in sys.modules:  # already paid for: nothing to save
        execute()
        return
    stand_in = types.ModuleType(_DYNAMO_UTILS)
    stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    sys.modules[_DYNAMO_UTILS] = stand_in
    try:
        execute()
    finally:
        if sys.modules.get(_DYNAMO_UTILS) is stand_in:
            del sys.modules[_DYNAMO_UTILS]


def _timm_typing(module: types.ModuleType, execute: Callable[[], None]) -> None:
    execute()
    import torch

    if getattr(module, "disable_compiler", None) is getattr(torch.compiler, "disable", None):
        module.disable_compiler = lazy_disable_compiler  # type: ignore[attr-defined]


HOOKS = {_ROI_ALIGN: _roi_align, _TIMM_TYPING: _timm_typing}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Hooked(spec.loader, HOOKS[name])
        return spec


def install() -> None:
    """Defer torch._dynamo past timm's and torchvision's imports in this process (modules already imported keep
    what they have)."""
    if os.environ.get("TEC_EAGER_DYNAMO") == "1" or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
