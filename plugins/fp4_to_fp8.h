// fp-export: shift-based FP4 (E2M1) -> FP8 (E4M3) cast. C API shared by the TensorRT plugin and
// the Python runtime (ctypes). Semantics: fp_export/numerics/fp4_to_fp8.py; layout: BRIEF section 1-2.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// packed: uint8 [rows, cols/2], element 2i in the low nibble; shift: int8 [rows, ceil(cols/group)]
// in [-5, 6] (the last group of a row partial when group does not divide cols); out: E4M3 bits
// uint8 [rows, cols]. cols and group even. Returns a
// cudaError_t value (0 on success, cudaErrorInvalidValue for bad sizes).
int fp_export_fp4_to_fp8(const uint8_t* packed, const int8_t* shift, uint8_t* out, int64_t rows,
                         int64_t cols, int64_t group, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
