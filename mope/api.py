"""Entry points that mirror PEFT's, importable without knowing PEFT's registration details."""

from __future__ import annotations

import os
from typing import Any

from peft import PeftModel, get_peft_model
from torch import nn

from .config import MoPEConfig
from .injection import ModelSnapshot


def get_mope_model(model: nn.Module, config: MoPEConfig, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with a MoPE adapter; same as ``peft.get_peft_model(model, config)``."""
    if not isinstance(config, MoPEConfig):
        raise ValueError(f"get_mope_model needs a MoPEConfig, got {type(config).__name__}")
    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def load_mope(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> PeftModel:
    """Load a MoPE bundle onto ``model``; same as ``PeftModel.from_pretrained`` once mope is imported.

    Having this function means ``mope`` is imported, so the ``MOPE`` PEFT type is registered:
    a process that never imported mope gets ``KeyError('MOPE')`` from PEFT instead.

    All or nothing: if anything fails once ``model`` is touched (PEFT's task class, reading or
    loading the weights), ``model`` is restored (modules, requires_grad, train/eval flags, hooks)
    before the error propagates. ``PeftModel.from_pretrained`` itself restores the model only
    for failures inside mope's injection: PEFT's own steps after it run beyond mope's reach.
    """
    # where the config is: a subfolder, a revision or a cache (PEFT reads the tensors with the same keywords)
    where = {key: kwargs[key] for key in ("subfolder", "revision", "cache_dir", "token") if key in kwargs}
    config = MoPEConfig.from_pretrained(os.fspath(path), **where)
    snapshot = ModelSnapshot(model)
    try:
        return PeftModel.from_pretrained(model, os.fspath(path), config=config, **kwargs)
    except BaseException:  # KeyboardInterrupt mid-load too: the model must not stay half-wrapped
        snapshot.restore()
        raise
