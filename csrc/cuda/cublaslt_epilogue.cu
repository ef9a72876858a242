// cuBLASLt matmuls with epilogues: see cublaslt_epilogue.h. Only the CUDA runtime and cuBLASLt headers.
#include "cublaslt_epilogue.h"

namespace {

cublasLtEpilogue_t lt_epilogue(tpk_epilogue epilogue, bool has_bias) {
  switch (epilogue) {
    case TPK_EPILOGUE_BIAS: return CUBLASLT_EPILOGUE_BIAS;
    case TPK_EPILOGUE_GELU: return has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    case TPK_EPILOGUE_GELU_AUX: return has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    case TPK_EPILOGUE_DGELU_BGRAD: return has_bias ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
    case TPK_EPILOGUE_BGRADB: return CUBLASLT_EPILOGUE_BGRADB;
    default: return CUBLASLT_EPILOGUE_DEFAULT;
  }
}

// Descriptors released on every path out of tpk_lt_matmul.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  ~Descriptors() {
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

#define TPK_CHECK(call)                               \
  do {                                                \
    cublasStatus_t status_ = (call);                  \
    if (status_ != CUBLAS_STATUS_SUCCESS) return status_; \
  } while (0)

extern "C" int tpk_lt_matmul(cublasLtHandle_t handle, cudaStream_t stream, tpk_epilogue epilogue,
                             cudaDataType_t ab_type, cudaDataType_t cd_type, int allow_tf32, int transa, int transb,
                             int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb,
                             float beta, const void* C, int64_t ldc, void* D, int64_t ldd, void* bias,
                             cudaDataType_t bias_type, void* aux, int64_t ld_aux, void* workspace,
                             size_t workspace_bytes) {
  Descriptors desc;
  const cublasComputeType_t compute =
      ab_type == CUDA_R_32F && allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  TPK_CHECK(cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F));
  const cublasOperation_t op_a = transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  const cublasLtEpilogue_t lt = lt_epilogue(epilogue, bias != nullptr);
  TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &lt, sizeof(lt)));
  if (bias != nullptr) {
    TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                             sizeof(bias_type)));
  }
  if (aux != nullptr) {
    TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
    TPK_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld_aux, sizeof(ld_aux)));
  }
  // Column-major layouts of the stored operands: op(A) is [m, k], so A is stored [m, k] or [k, m].
  TPK_CHECK(cublasLtMatrixLayoutCreate(&desc.a, ab_type, transa ? k : m, transa ? m : k, lda));
  TPK_CHECK(cublasLtMatrixLayoutCreate(&desc.b, ab_type, transb ? n : k, transb ? k : n, ldb));
  TPK_CHECK(cublasLtMatrixLayoutCreate(&desc.c, cd_type, m, n, C != nullptr ? ldc : ldd));
  TPK_CHECK(cublasLtMatrixLayoutCreate(&desc.d, cd_type, m, n, ldd));
  TPK_CHECK(cublasLtMatmulPreferenceCreate(&desc.preference));
  TPK_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &workspace_bytes, sizeof(workspace_bytes)));
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  TPK_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.c, desc.d, desc.preference, 1,
                                           &heuristic, &found));
  if (found == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  const float alpha = 1.0f;
  const float beta_used = C != nullptr ? beta : 0.0f;
  return cublasLtMatmul(handle, desc.op, &alpha, A, desc.a, B, desc.b, &beta_used, C != nullptr ? C : D, desc.c, D,
                        desc.d, &heuristic.algo, workspace, workspace_bytes, stream);
}
