// cuBLASLt matmuls with epilogues, behind a C interface that needs only the CUDA runtime and cuBLASLt
// headers (not torch's), so that CI compiles it for sm_90a and sm_80 on a machine without a GPU.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The epilogue applied to P = op(A) op(B) (+ beta C), in cuBLASLt's terms.
typedef enum {
  TPK_EPILOGUE_NONE = 0,           // D = P
  TPK_EPILOGUE_BIAS = 1,           // D = P + bias
  TPK_EPILOGUE_GELU = 2,           // D = gelu_tanh(P + bias?)
  TPK_EPILOGUE_GELU_AUX = 3,       // aux = P + bias?, D = gelu_tanh(aux): the forward that keeps z
  TPK_EPILOGUE_DGELU_BGRAD = 4,    // D = P * gelu_tanh'(aux), bias = sums of D over n (dZ and db)
  TPK_EPILOGUE_BGRADB = 5,         // D = P, bias = sums of op(B) over k (dW and db)
} tpk_epilogue;

// One matmul in column-major terms: D[m, n] = epilogue(op(A)[m, k] op(B)[k, n] + beta C[m, n]).
//   ab_type: CUDA_R_16BF, CUDA_R_16F or CUDA_R_32F; cd_type: ab_type or CUDA_R_32F (fp32 partials).
//   bias: [m] for BIAS and GELU, the gradient output for DGELU_BGRAD ([m]) and BGRADB ([n]); NULL: none.
//   aux: [m, n] with leading dimension ld_aux (a multiple of 8), cd_type; NULL unless GELU_AUX or DGELU.
//   allow_tf32: fp32 operands may run as TF32 (torch.backends.cuda.matmul.allow_tf32).
// Returns a cublasStatus_t: CUBLAS_STATUS_NOT_SUPPORTED when cuBLASLt has no algorithm for the problem.
int tpk_lt_matmul(cublasLtHandle_t handle, cudaStream_t stream, tpk_epilogue epilogue, cudaDataType_t ab_type,
                  cudaDataType_t cd_type, int allow_tf32, int transa, int transb, int64_t m, int64_t n, int64_t k,
                  const void* A, int64_t lda, const void* B, int64_t ldb, float beta, const void* C, int64_t ldc,
                  void* D, int64_t ldd, void* bias, cudaDataType_t bias_type, void* aux, int64_t ld_aux,
                  void* workspace, size_t workspace_bytes);

#ifdef __cplusplus
}
#endif
