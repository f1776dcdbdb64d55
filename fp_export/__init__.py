"""fp-export: W4A8 / W8A8 floating-point quantization (ZeroQuant-FP) of Hugging Face causal LMs,
exported to ONNX, validated with Polygraphy, built with TensorRT, served by Triton.

    import fp_export as fx
    qm = fx.quantize(fx.DEFAULT_MODEL, "w4a8-fp4-m2-lorc", out="out/w4a8")
    fx.evaluate(qm); fx.export_onnx(qm, "out/w4a8.onnx"); fx.validate(qm, "out/w4a8.onnx")

Stages, in import order (each imports only those before it): ``numerics``, then ``data``, ``hf``,
``quant``; ``checkpoint``, ``evaluate``; ``ptq``; ``export``; ``runtime``; ``build``; ``validate``;
``deploy``; this API; the CLI (``cli``).
"""

# Stage packages named like API functions (evaluate, validate, deploy) are imported first: importing
# a subpackage sets it as an attribute of this package, and it must not replace the function later.
import fp_export.deploy
import fp_export.evaluate
import fp_export.validate  # noqa: F401
from fp_export.api import (
    DEFAULT_MODEL, CalibrationConfig, QuantizedModel, Recipe, build_engine, deploy, evaluate, export_onnx, generate,
    load, load_recipe, quantize, serve, validate,
)

__all__ = ["DEFAULT_MODEL", "QuantizedModel", "Recipe", "CalibrationConfig", "load_recipe", "load", "quantize",
           "evaluate", "export_onnx", "validate", "build_engine", "generate", "deploy", "serve"]
