"""The export stage: ONNX graphs of quantized models (``onnx``), their ONNX Runtime reference
(``reference``), on a small graph builder (``graph``)."""
