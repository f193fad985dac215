"""The compiled parts of StreamFlow: the TreeSHAP kernel of per-prediction explanations and the forest
kernel of the forest runtime.

Everything else is configured in pyproject.toml. Each kernel is a C function (its Python module is empty)
that the server calls through ctypes (server/native.py). Both are optional: where no C compiler is at hand
the install goes on without them; the server then answers `explain` requests with FAILED_PRECONDITION
(EXPLANATIONS_UNAVAILABLE) and scores with ONNX instead of the forest kernel.
"""

from setuptools import Extension, setup  # type: ignore[import-untyped]

setup(
    ext_modules=[
        Extension(
            "streamflow.server._treeshap",
            sources=["server/_treeshap.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "streamflow.server._forest",
            sources=["server/_forest.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
    ]
)
