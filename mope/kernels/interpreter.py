"""Whether Triton's CPU interpreter can run the kernels with the installed Triton and NumPy (no Triton import)."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version


def interpreter_fault(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with these versions, or None.

    Before Triton 3.7 the interpreter turns a loop's runtime bound into a Python int with ``int()`` of
    a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"): every kernel with a loop fails. Triton 3.6 is what torch 2.11's CUDA wheels pin.
    """
    if Version(triton_version) < Version("3.7") and Version(numpy_version) >= Version("2.4"):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with NumPy {numpy_version}: "
            "it converts arrays to ints in a way NumPy 2.4 refuses (fixed in Triton 3.7); "
            "install triton>=3.7 or numpy<2.4"
        )
    return None


def installed_interpreter_fault() -> str | None:
    """:func:`interpreter_fault` for the installed Triton and NumPy (``mope.kernels.lora`` reads it once)."""
    try:
        numpy_version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return "Triton's interpreter (TRITON_INTERPRET=1) needs NumPy, which is not installed: pip install numpy"
    return interpreter_fault(importlib.metadata.version("triton"), numpy_version)
