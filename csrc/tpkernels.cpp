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
// CPU: the GEMM in the operands' own dtype through ATen (addmm: oneDNN or MKL, the bias added by the
// GEMM itself), then the epilogue in place on that output with ATen's own vectorized, parallel kernels
// (gelu_, add_). ATen compiles those per CPU capability (AVX2, AVX-512) and picks one at run time; this
// extension is built once with default flags, where at::vec falls back to a scalar std::erf per element,
// several times slower than eager's GELU (measured: 2x slower in fp32). Nothing is converted per call
// but 16-bit operands whose output is asked for in fp32 (the row stage's fp32 partials: ATen's CPU GEMM
// writes only its operands' dtype, and partials must not be rounded on the way). Eager does the
// same math with one more buffer per call; which of the two is faster, per shape, is the CPU table's
// business (tpkernels/backend_table_cpu.json). CUDA kernels (cuBLASLt epilogues) register in csrc/cuda/
// when the CUDA part is built.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace tpkernels {
namespace {

using at::Tensor;

c10::string_view approximate(int64_t activation) { return activation == 2 ? "tanh" : "none"; }

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

// ---- forward ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> epilogue_linear_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                               const c10::optional<Tensor>& residual, int64_t activation, bool owner,
                                               at::ScalarType out_dtype, bool store_preact) {
  check_linear(x, weight, bias);
  const bool add_residual = owner && residual.has_value();
  // fp32 partials of 16-bit operands must not be rounded to 16 bits on the way: ATen's CPU GEMM writes
  // only its operands' dtype, so those (and only those) widen the operands first, as eager does.
  const bool widen = out_dtype != x.scalar_type();
  const Tensor& a = widen ? x.to(out_dtype) : x;
  const Tensor& w = widen ? weight.to(out_dtype) : weight;
  // z = x @ W.T + b, b inside the GEMM (w.t() is a view: no copy of the weight)
  Tensor z = owner && bias.has_value() ? at::addmm(widen ? bias->to(out_dtype) : *bias, a, w.t()) : at::mm(a, w.t());
  Tensor out = z;
  if (activation != 0) {
    out = store_preact ? at::gelu(z, approximate(activation)) : at::gelu_(z, approximate(activation));
  } else if (store_preact) {
    out = z.clone();  // z is returned as the pre-activation; the output is its own tensor
  }
  if (add_residual) out.add_(*residual);
  Tensor preact = store_preact ? (widen ? z.to(x.scalar_type()) : z) : at::empty({0}, x.options());
  return {out, preact};
}

// ---- backward ----------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> epilogue_linear_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                                const c10::optional<Tensor>& preact, int64_t activation,
                                                                bool need_dx, bool need_dw, bool need_db) {
  TORCH_CHECK(activation == 0 || preact.has_value(), "tpkernels::epilogue_linear_backward: activation ", activation,
              " needs the stored pre-activation");
  // dZ = dY * act'(z) (ATen's gelu_backward), in x's dtype; db its column sums, accumulated in fp32. An
  // fp32 gradient of fp32 partials is summed as it is, and the GEMMs run in x's dtype.
  Tensor dz = grad.scalar_type() == x.scalar_type() ? grad : grad.to(x.scalar_type());
  if (activation != 0) dz = at::gelu_backward(dz, *preact, approximate(activation));
  const Tensor& summed = activation == 0 ? grad : dz;
  Tensor empty = at::empty({0}, x.options());
  Tensor db = need_db ? summed.sum(0, /*keepdim=*/false, at::kFloat).to(x.scalar_type()) : empty.clone();
  Tensor dx = need_dx ? at::mm(dz, weight) : empty;
  Tensor dw = need_dw ? at::mm(dz.t(), x) : empty.clone();
  return {dx, dw, db};
}

// dZ = (dY @ W) * act'(z) and db = its column sums: the MLP backward's dH GEMM, then ATen's dGELU on its
// output.
std::tuple<Tensor, Tensor> epilogue_dgelu_linear_cpu(const Tensor& grad, const Tensor& weight, const Tensor& preact,
                                                     int64_t activation, bool need_db) {
  TORCH_CHECK(grad.dim() == 2 && weight.dim() == 2 && grad.size(1) == weight.size(0),
              "tpkernels::epilogue_dgelu_linear: grad ", grad.sizes(), " and weight ", weight.sizes(), " do not chain");
  TORCH_CHECK(activation != 0, "tpkernels::epilogue_dgelu_linear: needs a GELU (activation 1 or 2)");
  const int64_t M = grad.size(0), H = weight.size(1);
  TORCH_CHECK(preact.dim() == 2 && preact.size(0) == M && preact.size(1) == H,
              "tpkernels::epilogue_dgelu_linear: preact is ", preact.sizes(), ", expected [", M, ", ", H, "]");
  Tensor dh = at::mm(grad.scalar_type() == weight.scalar_type() ? grad : grad.to(weight.scalar_type()), weight);
  Tensor dz = at::gelu_backward(dh, preact.scalar_type() == dh.scalar_type() ? preact : preact.to(dh.scalar_type()),
                                approximate(activation));
  if (dz.scalar_type() != preact.scalar_type()) dz = dz.to(preact.scalar_type());
  Tensor db = need_db ? dz.sum(0, /*keepdim=*/false, at::kFloat).to(preact.scalar_type()) : at::empty({0}, preact.options());
  return {dz, db};
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
