"""Content fingerprints of DataFrames: equal data gives an equal sha256 whatever the row order or file."""

from __future__ import annotations

import hashlib

import pandas as pd


def frame_fingerprint(frame: pd.DataFrame, sort_by: list[str]) -> str:
    """sha256 of a frame's content in a canonical form: rows sorted by `sort_by`, columns in name order.

    Hashes values, dtypes and column names, so a changed value, type or column changes the fingerprint.
    """
    canonical = frame.sort_values(sort_by, kind="mergesort").reset_index(drop=True)
    canonical = canonical[sorted(canonical.columns)]
    digest = hashlib.sha256()
    digest.update(repr([(name, str(dtype)) for name, dtype in canonical.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(canonical, index=False).to_numpy().tobytes())
    return digest.hexdigest()
