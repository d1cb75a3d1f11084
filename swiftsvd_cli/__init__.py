"""swiftsvd: closed-form, activation-aware optimal low-rank compression of LLMs (Swift-SVD).

The Python API, one function per stage, each taking its options dataclass (imported on first use, so
`import swiftsvd_cli` does not import torch):

    from swiftsvd_cli import CalibrateOptions, ModelSource, OneShotOptions, calibrate, compress, load_compressed

    calibrate(CalibrateOptions(source=ModelSource("demo"), work=Path("work"), data="demo", samples=64, seqlen=512))
    compress(OneShotOptions(source=ModelSource("demo"), ratio=0.8, out=Path("demo-0.8")))
    model, tokenizer = load_compressed("demo-0.8")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "calibrate": ("swiftsvd_cli.stages.calibrate", "run_calibrate"),
    "CalibrateOptions": ("swiftsvd_cli.stages.calibrate", "CalibrateOptions"),
    "CalibrationResult": ("swiftsvd_cli.stages.calibrate", "CalibrationResult"),
    "footprint": ("swiftsvd_cli.stages.calibrate", "dry_run"),
    "allocate": ("swiftsvd_cli.stages.allocate", "run_allocate"),
    "AllocateOptions": ("swiftsvd_cli.stages.allocate", "AllocateOptions"),
    "AllocationResult": ("swiftsvd_cli.stages.allocate", "AllocationResult"),
    "compress": ("swiftsvd_cli.stages.pipeline", "compress"),
    "CompressOptions": ("swiftsvd_cli.stages.compress", "CompressOptions"),
    "OneShotOptions": ("swiftsvd_cli.stages.pipeline", "OneShotOptions"),
    "CompressResult": ("swiftsvd_cli.stages.compress", "CompressResult"),
    "evaluate": ("swiftsvd_cli.stages.evaluate", "evaluate"),
    "EvalOptions": ("swiftsvd_cli.stages.evaluate", "EvalOptions"),
    "report": ("swiftsvd_cli.stages.report", "run_report"),
    "ReportOptions": ("swiftsvd_cli.stages.report", "ReportOptions"),
    "load_compressed": ("swiftsvd_cli.model.checkpoint", "load_compressed"),
    "load_model": ("swiftsvd_cli.model.loading", "load_model"),
    "ModelSource": ("swiftsvd_cli.model.loading", "ModelSource"),
    "DType": ("swiftsvd_cli.config", "DType"),
    "Method": ("swiftsvd_cli.config", "Method"),
    "Sampler": ("swiftsvd_cli.config", "Sampler"),
    "Strategy": ("swiftsvd_cli.config", "Strategy"),
    "FactorDType": ("swiftsvd_cli.config", "FactorDType"),
    "KVCache": ("swiftsvd_cli.config", "KVCache"),
    "GramProducts": ("swiftsvd_cli.config", "GramProducts"),
    "Offload": ("swiftsvd_cli.config", "Offload"),
    "SwiftSVDError": ("swiftsvd_cli.errors", "SwiftSVDError"),
}
__all__ = [
    "__version__",
    "calibrate",
    "CalibrateOptions",
    "CalibrationResult",
    "footprint",
    "allocate",
    "AllocateOptions",
    "AllocationResult",
    "compress",
    "CompressOptions",
    "OneShotOptions",
    "CompressResult",
    "evaluate",
    "EvalOptions",
    "report",
    "ReportOptions",
    "load_compressed",
    "load_model",
    "ModelSource",
    "DType",
    "Method",
    "Sampler",
    "Strategy",
    "FactorDType",
    "KVCache",
    "GramProducts",
    "Offload",
    "SwiftSVDError",
]  # tests/test_api.py: the same names as _API

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` imports on first use
    from swiftsvd_cli.config import DType, FactorDType, GramProducts, KVCache, Method, Offload, Sampler, Strategy
    from swiftsvd_cli.errors import SwiftSVDError
    from swiftsvd_cli.model.checkpoint import load_compressed
    from swiftsvd_cli.model.loading import ModelSource, load_model
    from swiftsvd_cli.stages.allocate import AllocateOptions, AllocationResult
    from swiftsvd_cli.stages.allocate import run_allocate as allocate
    from swiftsvd_cli.stages.calibrate import CalibrateOptions, CalibrationResult
    from swiftsvd_cli.stages.calibrate import dry_run as footprint
    from swiftsvd_cli.stages.calibrate import run_calibrate as calibrate
    from swiftsvd_cli.stages.compress import CompressOptions, CompressResult
    from swiftsvd_cli.stages.evaluate import EvalOptions, evaluate
    from swiftsvd_cli.stages.pipeline import OneShotOptions, compress
    from swiftsvd_cli.stages.report import ReportOptions
    from swiftsvd_cli.stages.report import run_report as report


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'swiftsvd_cli' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
