// tpkernels._C: the native backend's op schemas and their CPU kernels.
//
//   epilogue_linear(x [M, K], weight [N, K], bias [N]?, residual [M, N]?, activation, owner, out_dtype,
//                   store_preact) -> (out [M, N], preact [M, N] or empty)
//       out = act(x @ weight.T + bias) + residual, bias and residual only where `owner`
//   epilogue_linear_backward(grad [M, N], x, weight, preact?, activation, need_dx, need_dw, need_db)
//       -> (dX [M, K], dW [N, K], db [N]), each empty when not needed
//   epilogue_dgelu_linear(grad [M, N2], weight [N2, H], preact [M, H], activation, need_db)
//       -> (dZ = (grad @ weight) * act'(preact) [M, H], db = its column sums [H] or empty)
//
// The same contract as the Triton ops `tpkernels::fused_linear(_backward)`; Python registers their fake
// implementations and autograd. activation: 0 identity, 1 exact GELU, 2 tanh GELU.
//
// CPU: the GEMM through ATen (fp32 accumulation), then the epilogue in one vectorized (at::vec),
// parallel (at::parallel_for) pass over its fp32 output, cast once at the store. The backward's dZ =
// dY * act'(z) is one such pass too; db is then a column sum of dZ. CUDA kernels (cuBLASLt epilogues) register in
// csrc/cuda/ when the CUDA part is built.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace tpkernels {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr float kSqrt1_2 = 0.7071067811865476f;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kKappa = 0.044715f;

// ---- GELU and its derivative, scalar and vectorized (the same formulas as the Triton kernels) -----

inline float act(float x, int64_t activation) {
  if (activation == 1) return 0.5f * x * (1.0f + std::erf(x * kSqrt1_2));
  if (activation == 2) return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + kKappa * x * x * x)));
  return x;
}

inline float act_grad(float x, int64_t activation) {
  if (activation == 1) {
    return 0.5f * (1.0f + std::erf(x * kSqrt1_2)) + x * std::exp(-0.5f * x * x) * kInvSqrt2Pi;
  }
  const float t = std::tanh(kSqrt2OverPi * (x + kKappa * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kKappa * x * x);
}

inline Vec act(Vec x, int64_t activation) {
  const Vec half(0.5f), one(1.0f);
  if (activation == 1) return half * x * (one + (x * Vec(kSqrt1_2)).erf());
  if (activation == 2) {
    const Vec inner = Vec(kSqrt2OverPi) * (x + Vec(kKappa) * x * x * x);
    return half * x * (one + inner.tanh());
  }
  return x;
}

inline Vec act_grad(Vec x, int64_t activation) {
  const Vec half(0.5f), one(1.0f);
  if (activation == 1) {
    const Vec cdf = half * (one + (x * Vec(kSqrt1_2)).erf());
    return cdf + x * (Vec(-0.5f) * x * x).exp() * Vec(kInvSqrt2Pi);
  }
  const Vec x2 = x * x;
  const Vec t = (Vec(kSqrt2OverPi) * (x + Vec(kKappa) * x2 * x)).tanh();
  return half * (one + t) + half * x * (one - t * t) * Vec(kSqrt2OverPi) * (one + Vec(3.0f * kKappa) * x2);
}

// ---- checks ---------------------------------------------------------------------------------------

void check_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "tpkernels::epilogue_linear: x and weight must be 2-D, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "tpkernels::epilogue_linear: x has in_features=", x.size(1),
              " but weight ", weight.sizes(), " has ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "tpkernels::epilogue_linear: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "tpkernels::epilogue_linear: bias has shape ",
                bias->sizes(), " but weight has out_features=", weight.size(0));
  }
}

// The GEMM in fp32: 16-bit operands are widened first, so the epilogue sees an unrounded accumulator.
Tensor gemm_fp32(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// Rows [begin, end) of an [M, N] fp32 matrix through f(row pointer, row index), in parallel.
template <typename F>
void for_rows(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// ---- forward ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> epilogue_linear_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                               const c10::optional<Tensor>& residual, int64_t activation, bool owner,
                                               at::ScalarType out_dtype, bool store_preact) {
  check_linear(x, weight, bias);
  const int64_t M = x.size(0), N = weight.size(0);
  Tensor acc = gemm_fp32(x, weight.t()).contiguous();  // [M, N] fp32, written once more below in place
  const bool add_bias = owner && bias.has_value();
  const bool add_residual = owner && residual.has_value();
  Tensor bias32 = add_bias ? bias->to(at::kFloat).contiguous() : Tensor();
  Tensor residual32 = add_residual ? residual->to(at::kFloat).contiguous() : Tensor();
  Tensor preact = store_preact ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  Tensor preact32 = store_preact ? at::empty({M, N}, x.options().dtype(at::kFloat)) : Tensor();
  const float* b = add_bias ? bias32.data_ptr<float>() : nullptr;
  const float* r = add_residual ? residual32.data_ptr<float>() : nullptr;
  float* p = store_preact ? preact32.data_ptr<float>() : nullptr;
  float* a = acc.data_ptr<float>();
  const int64_t vec_end = N - N % Vec::size();
  for_rows(M, N, [&](int64_t i) {
    float* row = a + i * N;
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      Vec v = Vec::loadu(row + j);
      if (b) v = v + Vec::loadu(b + j);
      if (p) v.store(p + i * N + j);
      v = act(v, activation);
      if (r) v = v + Vec::loadu(r + i * N + j);
      v.store(row + j);
    }
    for (; j < N; ++j) {
      float v = row[j];
      if (b) v += b[j];
      if (p) p[i * N + j] = v;
      v = act(v, activation);
      if (r) v += r[i * N + j];
      row[j] = v;
    }
  });
  if (store_preact) preact.copy_(preact32);
  Tensor out = out_dtype == at::kFloat ? acc : acc.to(out_dtype);
  return {out, preact};
}

// ---- backward ----------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> epilogue_linear_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                                const c10::optional<Tensor>& preact, int64_t activation,
                                                                bool need_dx, bool need_dw, bool need_db) {
  const int64_t M = grad.size(0), N = grad.size(1);
  TORCH_CHECK(activation == 0 || preact.has_value(), "tpkernels::epilogue_linear_backward: activation ", activation,
              " needs the stored pre-activation");
  Tensor dz;
  Tensor db32;
  if (activation == 0) {
    dz = grad.to(x.scalar_type());
    if (need_db) db32 = grad.sum(0, /*keepdim=*/false, at::kFloat);
  } else {
    // dZ = dY * act'(z) in one vectorized pass over fp32 copies; db is its column sum afterwards.
    Tensor dy32 = grad.to(at::kFloat).contiguous();
    Tensor z32 = preact->to(at::kFloat).contiguous();
    Tensor dz32 = at::empty({M, N}, grad.options().dtype(at::kFloat));
    const float* dy = dy32.data_ptr<float>();
    const float* z = z32.data_ptr<float>();
    float* out = dz32.data_ptr<float>();
    const int64_t vec_end = N - N % Vec::size();
    for_rows(M, N, [&](int64_t i) {
      int64_t j = 0;
      for (; j < vec_end; j += Vec::size()) {
        (Vec::loadu(dy + i * N + j) * act_grad(Vec::loadu(z + i * N + j), activation)).store(out + i * N + j);
      }
      for (; j < N; ++j) out[i * N + j] = dy[i * N + j] * act_grad(z[i * N + j], activation);
    });
    if (need_db) db32 = dz32.sum(0);
    dz = dz32.to(x.scalar_type());
  }
  Tensor empty = at::empty({0}, x.options());
  Tensor dx = need_dx ? at::mm(dz, weight) : empty;
  Tensor dw = need_dw ? at::mm(dz.t(), x) : empty.clone();
  Tensor db = need_db ? db32.to(x.scalar_type()) : empty.clone();
  return {dx, dw, db};
}

// dZ = (dY @ W) * act'(z) and db = its column sums: the MLP backward's dH GEMM with the dGELU epilogue.
std::tuple<Tensor, Tensor> epilogue_dgelu_linear_cpu(const Tensor& grad, const Tensor& weight, const Tensor& preact,
                                                     int64_t activation, bool need_db) {
  TORCH_CHECK(grad.dim() == 2 && weight.dim() == 2 && grad.size(1) == weight.size(0),
              "tpkernels::epilogue_dgelu_linear: grad ", grad.sizes(), " and weight ", weight.sizes(), " do not chain");
  TORCH_CHECK(activation != 0, "tpkernels::epilogue_dgelu_linear: needs a GELU (activation 1 or 2)");
  const int64_t M = grad.size(0), H = weight.size(1);
  TORCH_CHECK(preact.dim() == 2 && preact.size(0) == M && preact.size(1) == H,
              "tpkernels::epilogue_dgelu_linear: preact is ", preact.sizes(), ", expected [", M, ", ", H, "]");
  Tensor acc = gemm_fp32(grad.to(weight.scalar_type()), weight).contiguous();
  Tensor z32 = preact.to(at::kFloat).contiguous();
  float* a = acc.data_ptr<float>();
  const float* z = z32.data_ptr<float>();
  const int64_t vec_end = H - H % Vec::size();
  for_rows(M, H, [&](int64_t i) {
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      (Vec::loadu(a + i * H + j) * act_grad(Vec::loadu(z + i * H + j), activation)).store(a + i * H + j);
    }
    for (; j < H; ++j) a[i * H + j] *= act_grad(z[i * H + j], activation);
  });
  Tensor db = need_db ? acc.sum(0).to(preact.scalar_type()) : at::empty({0}, preact.options());
  return {acc.to(preact.scalar_type()), db};
}

}  // namespace

TORCH_LIBRARY(tpkernels, m) {
  m.def(
      "epilogue_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int activation, bool owner, "
      "ScalarType out_dtype, bool store_preact) -> (Tensor, Tensor)");
  m.def(
      "epilogue_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor? preact, int activation, bool need_dx, "
      "bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def("epilogue_dgelu_linear(Tensor grad, Tensor weight, Tensor preact, int activation, bool need_db) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tpkernels, CPU, m) {
  m.impl("epilogue_linear", &epilogue_linear_cpu);
  m.impl("epilogue_linear_backward", &epilogue_linear_backward_cpu);
  m.impl("epilogue_dgelu_linear", &epilogue_dgelu_linear_cpu);
}

}  // namespace tpkernels

// A Python module, so that `import tpkernels._C` loads the library and its registrations.
extern "C" {
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "tpkernels native ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
}
