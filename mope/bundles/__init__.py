"""MoPE bundles on disk: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

``files``: read a bundle's tensor header and values, check them against a model.
``save``: crash-safe saves (the new folder is built beside the target and swapped in by one rename).
``upgrade``: read a config written by another mope version (explicit, logged upgrades).
``info``: describe a bundle without loading a model (``mope inspect``).
"""

from .files import describe_bad_values, describe_mismatch, read_bundle_header
from .save import save_pretrained

__all__ = ["describe_bad_values", "describe_mismatch", "read_bundle_header", "save_pretrained"]
