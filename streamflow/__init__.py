"""StreamFlow Serving: shared settings and the `streamflow` command.

Importing it turns off the usage telemetry of the libraries the pipeline and the server load (MLflow's, and
onnxruntime's, which otherwise writes a device id and an event database under ~/.cache/Microsoft): nothing
leaves a user's machine unless they ask for it by setting the variable themselves. It also keeps grpc's
core logging at errors (its documented default, read once at grpc's import): at its INFO level every
failed TLS handshake, which any peer can cause, is a plain-text line in the server's log.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
