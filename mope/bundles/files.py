"""Bundle files: PEFT's own ``adapter_config.json`` + ``adapter_model.safetensors``.

Loading checks the bundle before any weight is copied: the tensor file's header is read when
the config is loaded (no tensor data, nothing unpickled), and compared, after the experts are
attached, with the tensors the model expects. Any mismatch raises ``ValueError`` naming the
file and the tensors, and the model is restored (see ``MoPEModel.inject_adapter``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open


@dataclass(frozen=True)
class BundleHeader:
    """Where a config was loaded from, and the names and shapes of the bundle's tensors (no data)."""

    folder: str
    tensor_shapes: dict[str, tuple[int, ...]]

    @classmethod
    def read(cls, folder: str) -> BundleHeader:
        """The header, after checking every tensor's dtype and values (:func:`check_bundle_values`)."""
        header = cls(folder, read_bundle_header(folder))
        check_bundle_values(header.tensor_file)
        return header

    @property
    def tensor_file(self) -> str:
        return os.path.join(self.folder, SAFETENSORS_WEIGHTS_NAME)


def read_bundle_header(folder: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in ``folder/adapter_model.safetensors`` (header only)."""
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"MoPE bundle '{folder}' has no {SAFETENSORS_WEIGHTS_NAME}; mope bundles are safetensors only "
            "(pickled .bin files are never loaded)."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"Cannot read MoPE bundle file '{path}': it is truncated or not safetensors ({error})."
        ) from error


# The module whose tensors a bundle may hold as integers (a step count); every other tensor is a float parameter.
STEP_MODULE = "mope_schedule"
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_bundle_values(path: str, limit: int = 5) -> None:
    """Refuse a tensor file with non-float parameters, NaN / inf values or a negative step count, naming the tensors.

    Runs once per load, before any weight is copied: reading a bundle's few MB again costs little,
    and a non-finite expert would otherwise turn every output it touches into NaN. (safetensors has
    no checksum: a corrupted value that stays finite cannot be detected here.)
    """
    with safe_open(path, framework="pt") as handle:
        problem = describe_bad_values(((key, handle.get_tensor(key)) for key in handle.keys()), limit)  # noqa: SIM118
    if problem is not None:
        raise ValueError(f"MoPE bundle file '{path}' cannot be loaded: {problem}.")


def describe_bad_values(tensors: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> str | None:
    """What is wrong with a bundle's tensors (names -> values), or None: see :func:`check_bundle_values`."""
    wrong_dtype, non_finite, steps = [], [], []
    for key, tensor in tensors:
        if STEP_MODULE in key.split("."):
            if tensor.dtype not in INTEGER_DTYPES or (tensor < 0).any():
                value = tensor.item() if tensor.numel() == 1 else f"shape {list(tensor.shape)}"
                steps.append(f"{key} ({tensor.dtype}: {value})")
        elif not tensor.is_floating_point():
            wrong_dtype.append(f"{key} ({tensor.dtype})")
        elif not torch.isfinite(tensor.float()).all():  # float(): float8 has no isfinite of its own
            non_finite.append(key)
    problems = []
    if wrong_dtype:
        problems.append("non-float tensors where parameters must be floats: " + ", ".join(wrong_dtype[:limit]))
    if non_finite:
        more = f" and {len(non_finite) - limit} more" if len(non_finite) > limit else ""
        problems.append("NaN or inf values in " + ", ".join(non_finite[:limit]) + more)
    if steps:
        problems.append("a schedule step that is not a non-negative integer: " + ", ".join(steps[:limit]))
    return "; ".join(problems) or None


def describe_mismatch(
    path: str, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], limit: int = 5
) -> str | None:
    """A message listing missing, unexpected and wrongly shaped tensors, or None if they agree."""

    def listing(keys: list[str]) -> str:
        shown = ", ".join(keys[:limit])
        return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        problems.append(f"tensors for modules this model does not have: {listing(unexpected)}")
    if wrong:
        problems.append(
            "wrong shapes: " + listing([f"{k} is {list(found[k])}, model needs {list(expected[k])}" for k in wrong])
        )
    if not problems:
        return None
    hint = " The bundle was probably made for another base model or config." if unexpected or wrong else ""
    return f"MoPE bundle file '{path}' does not fit this model: " + "; ".join(problems) + "." + hint
