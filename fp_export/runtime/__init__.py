"""GPU runtime: the shift-cast CUDA kernel (ctypes), a fused Triton W4A8 GEMM, and a quantized
linear that runs either on the H100 (FP8 tensor cores) or, as a reference, on the CPU."""
