"""The build stage: a TensorRT engine from an exported ONNX graph with the Fp4ToFp8 plugin."""
