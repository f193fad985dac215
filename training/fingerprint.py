"""Content fingerprints of DataFrames: a sha256 of column names, types and values, in row order.

Callers give frames in a canonical row order (training sets are sorted by user_id, demo tables come out of a
seeded generator in a fixed order); sorting here would cost more than the hashing at a million rows.
"""

from __future__ import annotations

import hashlib

import pandas as pd

_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in the ids or category names being joined


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of a frame's content: a changed value, type, column or row order changes it."""
    digest = hashlib.sha256()
    for name in sorted(frame.columns):
        column = frame[name]
        digest.update(f"{name}:{column.dtype}:{len(column)}\n".encode())
        # Timestamps as integers in the dtype's unit (named above): to_numpy would box each one in Python.
        values = column.array.asi8 if isinstance(column.dtype, pd.DatetimeTZDtype) else column.to_numpy()
        if values.dtype == object:
            digest.update(_SEPARATOR.join(map(str, values)).encode())
        else:
            digest.update(values.tobytes())
    return digest.hexdigest()
