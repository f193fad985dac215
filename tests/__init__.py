"""StreamFlow Serving test suite."""

import streamflow  # noqa: F401 - before any test module loads MLflow or onnxruntime: their telemetry stays off
