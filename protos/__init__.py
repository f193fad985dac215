"""The contract's tooling (`generate.py`) as a package: mypy then checks it as `protos.generate` instead of
putting protos/ on its search path, where the vendored `google/` would hide googleapis' `google.rpc`."""
