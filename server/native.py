"""The compiled kernels: C libraries that pip builds at install (setup.py), called through ctypes, which
releases the GIL for the call. Each is optional: where no C compiler was at hand the install goes on without
them, and what needs one says so (explanations answer EXPLANATIONS_UNAVAILABLE; the forest runtime is not
chosen)."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path
from typing import Any

import numpy as np


@functools.cache
def kernel(library: str, function: str, returns: Any = None) -> Any:
    """`function` of the compiled `library` (e.g. `_forest`) beside this module, returning `returns` (a ctypes
    type, None for void); raises FileNotFoundError when this install has not built it."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{library}{suffix}"
        if path.is_file():
            compiled = getattr(ctypes.CDLL(str(path)), function)
            compiled.restype = returns
            return compiled
    raise FileNotFoundError(
        f"the compiled {library} kernel is not built in {here}; reinstall (`make install`, which needs a C "
        "compiler)"
    )


def available(library: str, function: str, returns: Any = None) -> bool:
    """Whether this install has the compiled `function`."""
    try:
        kernel(library, function, returns)
    except OSError:
        return False
    return True


def address(array: np.ndarray) -> ctypes.c_void_p:
    """Where a C-contiguous array's data starts, for a kernel argument."""
    return ctypes.c_void_p(array.ctypes.data)
