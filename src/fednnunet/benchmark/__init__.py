"""The paper's protocol in one call: local vs centralized vs FFE vs AsymFedAvg on the same splits and budget.

See :mod:`fednnunet.benchmark.protocol`. The import is lazy so that ``python -m fednnunet.benchmark.protocol``
(the benchmark's worker processes) does not find the module already imported by the package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_benchmark", "BenchmarkError", "METHODS"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fednnunet.benchmark import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
