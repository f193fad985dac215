"""The one compiled part of StreamFlow: the TreeSHAP kernel of per-prediction explanations.

Everything else is configured in pyproject.toml. The kernel is a C function (its Python module is empty)
that the server calls through ctypes (server/explanations.py). It is optional: where no C compiler is at
hand the install goes on without it, and the server answers `explain` requests with FAILED_PRECONDITION
(EXPLANATIONS_UNAVAILABLE) instead.
"""

from setuptools import Extension, setup  # type: ignore[import-untyped]

setup(
    ext_modules=[
        Extension(
            "streamflow.server._treeshap",
            sources=["server/_treeshap.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
