"""Time a call spends inside StreamFlow, read from the server's own Prometheus histograms around a load.

`grpc_server_handling_seconds` runs from the call reaching StreamFlow's call layer to its answer, so the
difference between a Predict's and a health Check's is all of Predict's own work; the feature read and the
inference are parts of it (`streamflow_feature_read_seconds`, `streamflow_inference_seconds`, one
observation per scoring, which at these loads is one per call). The rest of a call's latency (the client, the
kernel, grpc's own work around the handler) a Check pays as well.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

HANDLING = "grpc_server_handling_seconds"
PARTS = {
    "feature read": "streamflow_feature_read_seconds",
    "inference": "streamflow_inference_seconds",
}
"""Parts of a Predict's handler, by the name the bench prints."""

Sums = dict[tuple[str, str], tuple[float, float]]
"""(histogram, gRPC method or "") -> (sum of seconds, count), summed over the workers."""


def read(metrics_port: int) -> Sums:
    """The handling and scoring histograms' sums and counts now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    wanted = (HANDLING, *PARTS.values())
    sums: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            key = (family.name, sample.labels.get("grpc_method", ""))
            if sample.name == f"{family.name}_sum":
                sums[key][0] += sample.value
            elif sample.name == f"{family.name}_count":
                sums[key][1] += sample.value
    return {key: (total, count) for key, (total, count) in sums.items()}


def mean_ms(before: Sums, after: Sums, histogram: str, method: str = "") -> float | None:
    """The mean observation between two reads, in ms; None when nothing was observed."""
    total, count = after.get((histogram, method), (0.0, 0.0))
    total_before, count_before = before.get((histogram, method), (0.0, 0.0))
    if count == count_before:
        return None
    return (total - total_before) / (count - count_before) * 1000
