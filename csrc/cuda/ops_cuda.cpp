// The CUDA kernels of tpkernels::epilogue_linear(_backward): cuBLASLt with its epilogues
// (cublaslt_epilogue.cu), the handle, stream and workspace taken from torch. Built only where torch has
// CUDA and nvcc is present (setup.py); the CPU kernels and the schemas are in ../tpkernels.cpp.
//
// Row-major torch tensors are column-major transposes, so y[M, N] = x[M, K] @ w[N, K].T is the
// column-major D[N, M] = op(w) op(x) with op(w) = T (w is column-major [K, N]) and op(x) = N.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <tuple>

#include "cublaslt_epilogue.h"

namespace tpkernels {
namespace {

using at::Tensor;

constexpr size_t kWorkspaceBytes = 32 << 20;  // NVIDIA's recommendation for Hopper

cudaDataType_t cuda_type(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "tpkernels cuBLASLt backend: unsupported dtype ", type);
  }
}

void matmul(tpk_epilogue epilogue, bool transa, bool transb, int64_t m, int64_t n, int64_t k, const Tensor& a,
            int64_t lda, const Tensor& b, int64_t ldb, const c10::optional<Tensor>& c, Tensor& d, void* bias,
            at::ScalarType bias_type, void* aux, int64_t ld_aux) {
  Tensor workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, a.options().dtype(at::kByte));
  const int status = tpk_lt_matmul(
      at::cuda::getCurrentCUDABlasLtHandle(), at::cuda::getCurrentCUDAStream(), epilogue, cuda_type(a.scalar_type()),
      cuda_type(d.scalar_type()), at::globalContext().allowTF32CuBLAS(), transa, transb, m, n, k, a.data_ptr(), lda,
      b.data_ptr(), ldb, 1.0f, c.has_value() ? c->data_ptr() : nullptr, c.has_value() ? c->stride(0) : d.stride(0),
      d.data_ptr(), d.stride(0), bias, cuda_type(bias_type), aux, ld_aux, workspace.data_ptr(), kWorkspaceBytes);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "tpkernels cuBLASLt backend: cublasLtMatmul failed with status ",
              status, " for m=", m, " n=", n, " k=", k, "; backend='triton' runs the same op");
}

std::tuple<Tensor, Tensor> epilogue_linear_cuda(const Tensor& x_in, const Tensor& weight_in,
                                                const c10::optional<Tensor>& bias_in,
                                                const c10::optional<Tensor>& residual_in, int64_t activation,
                                                bool owner, at::ScalarType out_dtype, bool store_preact) {
  TORCH_CHECK(activation != 1, "tpkernels cuBLASLt backend: cuBLASLt's GELU is the tanh form; exact GELU runs on "
              "backend='triton'");
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  Tensor preact = at::empty({store_preact ? M : 0, store_preact ? N : 0}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return {out, preact};
  if (K == 0) {  // no product: the epilogue of zero, in ATen
    Tensor z = at::zeros({M, N}, x.options().dtype(at::kFloat));
    if (owner && bias_in.has_value()) z = z + bias_in->to(at::kFloat);
    if (store_preact) preact.copy_(z);
    Tensor y = activation == 2 ? at::gelu(z, "tanh") : z;
    if (owner && residual_in.has_value()) y = y + residual_in->to(at::kFloat);
    return {y.to(out_dtype), store_preact ? preact.to(x.scalar_type()) : preact};
  }
  c10::optional<Tensor> residual;
  if (owner && residual_in.has_value()) residual = residual_in->to(out_dtype).contiguous();
  Tensor bias;
  if (owner && bias_in.has_value()) bias = bias_in->to(out_dtype).contiguous();  // cuBLASLt wants D's type
  void* bias_ptr = bias.defined() ? bias.data_ptr() : nullptr;
  const at::ScalarType bias_type = bias.defined() ? bias.scalar_type() : x.scalar_type();
  tpk_epilogue epilogue = bias_ptr ? TPK_EPILOGUE_BIAS : TPK_EPILOGUE_NONE;
  void* aux = nullptr;
  if (activation == 2) {
    TORCH_CHECK(!residual.has_value(), "tpkernels cuBLASLt backend: a residual after GELU is not an epilogue "
                "cuBLASLt has");
    epilogue = store_preact ? TPK_EPILOGUE_GELU_AUX : TPK_EPILOGUE_GELU;
    aux = store_preact ? preact.data_ptr() : nullptr;
  } else if (store_preact) {
    TORCH_CHECK(false, "tpkernels cuBLASLt backend: store_preact is for a GELU epilogue");
  }
  matmul(epilogue, /*transa=*/true, /*transb=*/false, N, M, K, weight, K, x, K, residual, out, bias_ptr, bias_type,
         aux, N);
  if (store_preact && preact.scalar_type() != x.scalar_type()) preact = preact.to(x.scalar_type());
  return {out, preact};
}

std::tuple<Tensor, Tensor, Tensor> epilogue_linear_backward_cuda(const Tensor& grad_in, const Tensor& x_in,
                                                                 const Tensor& weight_in,
                                                                 const c10::optional<Tensor>& preact,
                                                                 int64_t activation, bool need_dx, bool need_dw,
                                                                 bool need_db) {
  TORCH_CHECK(activation != 1, "tpkernels cuBLASLt backend: exact GELU runs on backend='triton'");
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  // dZ: the gradient itself, or one elementwise pass through GELU's derivative.
  Tensor dz = activation == 0 ? grad_in.to(x.scalar_type()).contiguous()
                              : at::gelu_backward(grad_in.to(x.scalar_type()), *preact, "tanh").contiguous();
  Tensor empty = at::empty({0}, x.options());
  Tensor dx = empty, dw = empty.clone(), db = empty.clone();
  if (need_dx) {  // dX[M, K] = dZ[M, N] @ W[N, K]: column-major D[K, M] = op(W) op(dZ), both N
    dx = at::empty({M, K}, x.options());
    if (M && K && N) matmul(TPK_EPILOGUE_NONE, false, false, K, M, N, weight, K, dz, N, c10::nullopt, dx, nullptr,
                            x.scalar_type(), nullptr, 0);
    else dx.zero_();
  }
  if (need_dw) {  // dW[N, K] = dZ.T @ X: column-major D[K, N] = op(X) op(dZ) with op(dZ) = T; db from BGRADB
    dw = at::empty({N, K}, x.options());
    if (need_db) db = at::empty({N}, x.options());
    if (N && K && M) {
      matmul(need_db ? TPK_EPILOGUE_BGRADB : TPK_EPILOGUE_NONE, false, true, K, N, M, x, K, dz, N, c10::nullopt, dw,
             need_db ? db.data_ptr() : nullptr, x.scalar_type(), nullptr, 0);
    } else {
      dw.zero_();
      if (need_db) db = dz.sum(0, false, at::kFloat).to(x.scalar_type());
    }
  } else if (need_db) {
    db = dz.sum(0, false, at::kFloat).to(x.scalar_type());
  }
  return {dx, dw, db};
}

// dZ[M, H] = (dY[M, N2] @ W[N2, H]) * gelu_tanh'(z), db = column sums of dZ: one DGELU_BGRAD matmul,
// column-major D[H, M] = op(W) op(dY), both N, with z as its aux ([H, M], ld H).
std::tuple<Tensor, Tensor> epilogue_dgelu_linear_cuda(const Tensor& grad_in, const Tensor& weight_in,
                                                      const Tensor& preact_in, int64_t activation, bool need_db) {
  TORCH_CHECK(activation == 2, "tpkernels cuBLASLt backend: DGELU is the tanh GELU's; exact GELU runs on "
              "backend='triton'");
  const Tensor weight = weight_in.contiguous(), preact = preact_in.contiguous();
  const Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  const int64_t M = grad.size(0), N2 = grad.size(1), H = weight.size(1);
  Tensor dz = at::empty({M, H}, preact.options());
  Tensor db = at::empty({need_db ? H : 0}, preact.options());
  if (M == 0 || H == 0 || N2 == 0) {
    dz.zero_();
    if (need_db) db.zero_();
    return {dz, db};
  }
  matmul(TPK_EPILOGUE_DGELU_BGRAD, false, false, H, M, N2, weight, H, grad, N2, c10::nullopt, dz,
         need_db ? db.data_ptr() : nullptr, preact.scalar_type(), preact.data_ptr(), H);
  return {dz, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(tpkernels, CUDA, m) {
  m.impl("epilogue_linear", &epilogue_linear_cuda);
  m.impl("epilogue_linear_backward", &epilogue_linear_backward_cuda);
  m.impl("epilogue_dgelu_linear", &epilogue_dgelu_linear_cuda);
}

}  // namespace tpkernels
