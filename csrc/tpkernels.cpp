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
// CPU forward: oneDNN through ATen's own ops (`mkldnn::_linear_pointwise`, which inductor's CPU backend
// also calls): one oneDNN GEMM with the bias and the GELU (exact or tanh) as post-ops of its kernel, and
// the residual as a binary-add post-op, so no pass over the output follows. The weight runs from a copy in
// oneDNN's blocked layout (`mkldnn::_reorder_linear_weight`), packed once per weight version, where the
// user turned the packed-weight cache on (`weight_for_onednn`, below): eager's GEMM repacks the weight's
// panels on every call, and that pack is most of the time at decode. The row stage's fp32 partials of
// 16-bit operands (oneDNN's linear writes its operands' dtype, and partials must not be rounded on the
// way) run on fp32 operands: with the cache on, an fp32 packed copy, so the weight is widened once per
// version rather than per call. Where oneDNN cannot run (no oneDNN in this torch, fp16, a
// dtype this CPU's oneDNN refuses, empty shapes) the forward is ATen's addmm, then gelu_ and add_ in place.
// The backward: ATen's GEMMs and its gelu_backward. CUDA kernels (cuBLASLt epilogues) register in csrc/cuda/
// when the CUDA part is built.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

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

// ---- oneDNN through ATen's registered ops ------------------------------------------------------------

// Called boxed: these ops are registered by TORCH_LIBRARY in libtorch_cpu, with no C++ header shipped.
// Each handle is looked up once (the dispatcher's lookup by name costs microseconds on every call).
Tensor call_boxed(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

c10::OperatorHandle handle(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

// The batch size oneDNN's weight layout is chosen for; 16, 64 and 512 ran alike at M = 1 to 512 (fp32 and
// bf16, K x N = 4096 x 2048 and 1024 x 4096, this project's CPU), so one packed copy serves every M.
constexpr int64_t kPackHint = 64;

Tensor pack(const Tensor& weight) {
  static const c10::OperatorHandle op = handle("mkldnn::_reorder_linear_weight", "");
  return call_boxed(op, {weight.contiguous(), c10::IValue(kPackHint)});
}

// y = x @ w.T + bias, then `attr` ("none" or "gelu" with algorithm "none" or "tanh"), inside oneDNN's kernel.
Tensor onednn_linear(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias, const char* attr,
                     c10::optional<std::string> algorithm) {
  static const c10::OperatorHandle op = handle("mkldnn::_linear_pointwise", "");
  return call_boxed(op,
                    {x, w, c10::IValue(bias), c10::IValue(std::string(attr)),
                     c10::IValue(c10::List<c10::optional<c10::Scalar>>()), c10::IValue(std::move(algorithm))});
}

// y = x @ w.T + bias + other, the add a post-op of oneDNN's kernel.
Tensor onednn_linear_add(const Tensor& x, const Tensor& other, const Tensor& w, const c10::optional<Tensor>& bias) {
  static const c10::OperatorHandle op = handle("mkldnn::_linear_pointwise", "binary");
  return call_boxed(op,
                    {x, other, w, c10::IValue(bias), c10::IValue(std::string("add"))});
}

// Whether oneDNN's linear runs `dtype` on this CPU: fp32 wherever torch has oneDNN; bf16 where oneDNN has
// a kernel for it (AVX-512 or AVX-NE-CONVERT; elsewhere the op refuses). Asked once per dtype, by running it.
bool onednn_runs(at::ScalarType dtype) {
  static std::mutex mutex;
  static std::map<at::ScalarType, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(dtype);
  if (found != known.end()) return found->second;
  bool runs = false;
  if (at::hasMKLDNN() && (dtype == at::kFloat || dtype == at::kBFloat16) &&
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}).has_value()) {
    try {
      auto options = at::TensorOptions().dtype(dtype);
      Tensor y = onednn_linear(at::ones({2, 8}, options), pack(at::ones({4, 8}, options)), c10::nullopt, "gelu",
                               std::string("none"));
      runs = y.size(0) == 2 && y.size(1) == 4;
    } catch (const c10::Error&) {
      runs = false;
    }
  }
  known.emplace(dtype, runs);
  return runs;
}

// ---- the packed-weight cache -----------------------------------------------------------------------------
//
// Off unless turned on (tpkernels::cpu_weight_cache, extension.cpu_weight_cache in Python): a packed copy
// is valid only while every write to the weight moves its version counter, and a write through `.data`
// (`w.data.copy_(...)`, as some optimizers and EMA updates do) does not; the user who turns it on vouches
// for that. Off, oneDNN reorders the plain weight inside each call, as eager's GEMM packs its panels.
//
// On: one packed copy per (weight view, dtype of the copy), valid while the weight's storage lives and its
// version counter (which every in-place write bumps: an optimizer step, load_state_dict's copy_) has not
// moved. The key is the view (storage, offset, sizes, strides), not the TensorImpl, so a shard view made
// anew on every call still finds its copy. Entries of freed storage, and a key's older version, are
// dropped when a copy is made. The copies together take at most the budget (a quarter of the machine's
// memory unless set); a weight that does not fit runs plain. Inference tensors carry no version counter,
// so they always run plain.

struct PackKey {
  const c10::StorageImpl* storage;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool operator<(const PackKey& o) const {
    return std::tie(storage, offset, sizes, strides, dtype) < std::tie(o.storage, o.offset, o.sizes, o.strides, o.dtype);
  }
  bool operator==(const PackKey& o) const { return !(*this < o) && !(o < *this); }
};

struct PackEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t version;
  Tensor packed;
  int64_t bytes;
};

struct PackCache {
  std::mutex mutex;
  bool enabled = false, paused = false;  // paused: off, copies kept (the benchmarks' A/B of one weight)
  int64_t budget = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE) / 4;
  std::map<PackKey, PackEntry> entries;
  int64_t bytes = 0, hits = 0, packs = 0, refused = 0;

  // Drops freed weights' copies, `stale` (a key whose version moved) and, to fit a budget, everything.
  void sweep(const PackKey* stale, bool all) {
    for (auto it = entries.begin(); it != entries.end();) {
      if (all || it->second.storage.expired() || (stale != nullptr && it->first == *stale)) {
        bytes -= it->second.bytes;
        it = entries.erase(it);
      } else {
        ++it;
      }
    }
  }
};

PackCache& cache() {
  static PackCache* instance = new PackCache();  // never destroyed: tensors outlive static teardown order
  return *instance;
}

// The weight for oneDNN's linear of `rows` rows, in `dtype`: the cached packed copy (made now if missing or
// stale), or the plain weight where the cache is off, cannot vouch for it, or is full. fp32 at one row
// always reads the plain weight: oneDNN's GEMV on it beat the packed copy (0.81 against 1.07 ms at
// K x N = 4096 x 2048, 0.97 against 1.33 at 2048 x 4096; a tie at 2 rows, the copy ahead from 4). bf16
// gains most from the copy exactly there.
Tensor weight_for_onednn(const Tensor& weight, at::ScalarType dtype, int64_t rows) {
  auto plain = [&] { return weight.scalar_type() == dtype ? weight.contiguous() : weight.to(dtype); };
  if (rows == 1 && weight.scalar_type() == at::kFloat) return plain();
  PackCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);  // held while packing: a second caller waits for the copy
  if (!c.enabled || c.paused || weight.is_inference() || !weight.has_storage()) return plain();
  PackKey key{weight.storage().unsafeGetStorageImpl(), weight.storage_offset(), weight.sizes().vec(),
              weight.strides().vec(), dtype};
  const int64_t version = weight._version();
  auto found = c.entries.find(key);
  if (found != c.entries.end() && found->second.version == version && !found->second.storage.expired()) {
    ++c.hits;
    return found->second.packed;
  }
  c.sweep(&key, false);
  const int64_t bytes = weight.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  if (c.bytes + bytes > c.budget) {
    ++c.refused;
    return plain();
  }
  Tensor packed = pack(plain());
  ++c.packs;
  c.bytes += bytes;
  c.entries.emplace(std::move(key), PackEntry{weight.storage().getWeakStorageImpl(), version, packed, bytes});
  return packed;
}

// tpkernels::cpu_weight_cache(enabled, budget): enabled 1 turns the cache on, 0 off and empties it, 2
// pauses it (off, its copies kept for when 1 resumes it), -1 keeps the state; budget >= 0 sets it in
// bytes and empties the cache if it holds more, -1 keeps it. Returns [state (0 off, 1 on, 2 paused),
// budget, bytes held, copies held, hits, packs, refused].
std::vector<int64_t> cpu_weight_cache(int64_t enabled, int64_t budget) {
  PackCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (enabled >= 0) {
    c.enabled = enabled != 0;
    c.paused = enabled == 2;
  }
  if (budget >= 0) c.budget = budget;
  c.sweep(nullptr, !c.enabled || c.bytes > c.budget);
  return {c.paused ? 2 : c.enabled ? 1 : 0, c.budget, c.bytes, static_cast<int64_t>(c.entries.size()), c.hits,
          c.packs, c.refused};
}

// ---- forward ---------------------------------------------------------------------------------------

// ATen's path: addmm in the operands' dtype (widened where fp32 partials of 16-bit operands are asked
// for), then gelu_ and add_ in place. For what oneDNN does not run.
std::tuple<Tensor, Tensor> epilogue_linear_aten(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                                const c10::optional<Tensor>& residual, int64_t activation, bool owner,
                                                at::ScalarType out_dtype, bool store_preact) {
  const bool widen = out_dtype != x.scalar_type();
  const Tensor& a = widen ? x.to(out_dtype) : x;
  const Tensor& w = widen ? weight.to(out_dtype) : weight;
  Tensor z = owner && bias.has_value() ? at::addmm(bias->to(out_dtype), a, w.t()) : at::mm(a, w.t());
  Tensor out = z;
  if (activation != 0) {
    out = store_preact ? at::gelu(z, approximate(activation)) : at::gelu_(z, approximate(activation));
  } else if (store_preact) {
    out = z.clone();  // z is returned as the pre-activation; the output is its own tensor
  }
  if (owner && residual.has_value()) out.add_(*residual);
  Tensor preact = store_preact ? (widen ? z.to(x.scalar_type()) : z) : at::empty({0}, x.options());
  return {out, preact};
}

std::tuple<Tensor, Tensor> epilogue_linear_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                               const c10::optional<Tensor>& residual, int64_t activation, bool owner,
                                               at::ScalarType out_dtype, bool store_preact) {
  check_linear(x, weight, bias);
  const bool degenerate = x.size(0) == 0 || x.size(1) == 0 || weight.size(0) == 0;
  if (degenerate || !onednn_runs(out_dtype) || !(out_dtype == x.scalar_type() || out_dtype == at::kFloat)) {
    return epilogue_linear_aten(x, weight, bias, residual, activation, owner, out_dtype, store_preact);
  }
  // In out_dtype: the operands' own, or fp32 for the row stage's fp32 partials of 16-bit operands.
  const Tensor a = x.scalar_type() == out_dtype ? x.contiguous() : x.to(out_dtype);
  const Tensor w = weight_for_onednn(weight, out_dtype, x.size(0));
  c10::optional<Tensor> b;
  if (owner && bias.has_value()) b = bias->scalar_type() == out_dtype ? bias->contiguous() : bias->to(out_dtype);
  const bool add_residual = owner && residual.has_value();
  if (activation == 0) {
    // The residual as oneDNN's post-op where it is the output's shape and dtype and no pre-activation (the
    // output before the residual) is asked for; else one add_ after.
    const bool fused_add = add_residual && !store_preact && residual->scalar_type() == out_dtype &&
                           residual->sizes() == c10::IntArrayRef{x.size(0), weight.size(0)};
    Tensor out = fused_add ? onednn_linear_add(a, residual->contiguous(), w, b)
                           : onednn_linear(a, w, b, "none", c10::nullopt);
    Tensor preact = store_preact ? (out.scalar_type() == x.scalar_type() ? out.clone() : out.to(x.scalar_type()))
                                 : at::empty({0}, x.options());
    if (add_residual && !fused_add) out.add_(*residual);
    return {out, preact};
  }
  if (!store_preact) {  // the whole epilogue inside oneDNN's kernel
    Tensor out = onednn_linear(a, w, b, "gelu", std::string(approximate(activation)));
    if (add_residual) out.add_(*residual);
    return {out, at::empty({0}, x.options())};
  }
  // The backward needs z: the GEMM with its bias, then GELU from z into a new output.
  Tensor z = onednn_linear(a, w, b, "none", c10::nullopt);
  Tensor out = at::gelu(z, approximate(activation));
  if (add_residual) out.add_(*residual);
  return {out, z.scalar_type() == x.scalar_type() ? z : z.to(x.scalar_type())};
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
  m.def("cpu_weight_cache(int enabled, int budget) -> int[]", &cpu_weight_cache);
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
