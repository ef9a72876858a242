"""The unfused eager baseline of every op: ground truth for tests and benchmarks.

Also what CPU tensors run when the Triton interpreter is off. Shapes are those of the fused ops:

    linear_gelu     x [..., K], weight [N, K], bias [N]                -> [..., N]
    linear_partial  x_shard_k [..., K_r], weight_shard_k [N, K_r], ... -> partial [..., N]
    fp8_linear      x_q [M, K] fp8, w_q [N, K] fp8, their dequantizing scales -> (out, preact, amax)
    glu             x [..., K], gate [F, K], up [F, K], their biases [F]      -> act(x Wg.T + bg) * (x Wu.T + bu)
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "gelu", "gelu_tanh", "silu")  # indexed by the kernels' ACTIVATION codes


def activation(z, code):
    if code == 0:
        return z
    if code == 3:
        return F.silu(z)
    return F.gelu(z, approximate="tanh" if code == 2 else "none")


def activation_backward(grad, z, code):
    """grad * act'(z), as eager autograd computes it."""
    if code == 3:
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if code == 2 else "none")


def linear_gelu(x, weight, bias=None, approximate="none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_partial(x, weight, bias=None, *, residual=None, owner=True, out_dtype=None):
    out, _ = fused_linear(x, weight, bias, residual, 0, owner, out_dtype or x.dtype, False)
    return out


class _UnownedTerms(torch.autograd.Function):
    """out as it is, with the gradients the bias and residual would get had they been added (sum(dY),
    dY): a rank that does not own them still gives its replicas the gradient every other rank's do."""

    @staticmethod
    def forward(ctx, out, bias, residual):
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        db = None if ctx.bias_dtype is None else grad.reshape(grad.shape[:-1].numel(), grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        dr = None if ctx.residual_dtype is None else grad.to(ctx.residual_dtype)
        return grad, db, dr


def fused_linear(x, weight, bias, residual, act, owner, out_dtype, store_preact):
    """Eager `act(x @ weight.T + bias) + residual`, bias and residual only where `owner`.

    Returns (out, preact); preact is empty unless `store_preact`. A wider `out_dtype` (fp32
    partials) computes in that dtype, as an eager user would.
    """
    if out_dtype != x.dtype:
        x, weight = x.to(out_dtype), weight.to(out_dtype)
        bias = None if bias is None else bias.to(out_dtype)
    preact = F.linear(x, weight, bias if owner else None)
    out = activation(preact, act)
    if owner and residual is not None:
        out = out + residual
    if not owner and act == 0 and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (bias, residual)):
        out = _UnownedTerms.apply(out, bias, residual)  # a partial sum: only linear terms go unowned
    out = out.to(out_dtype)
    return out, (preact if store_preact else preact.new_empty(0))


def fused_linear_backward(grad, x, weight, preact, act, need_dx, need_dw, need_db):
    """Eager gradients of `fused_linear` for x [M, K], weight [N, K], bias [N]; None where not needed."""
    grad = grad.to(x.dtype)
    if act != 0:
        grad = activation_backward(grad, preact, act)
    dx = grad @ weight if need_dx else None
    dw = grad.t() @ x if need_dw else None
    db = grad.sum(0, dtype=torch.float32).to(x.dtype) if need_db else None
    return dx, dw, db


# The largest finite value of each fp8 format: quantized values saturate there.
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def fp8_quantize(t, scale, dtype=torch.float8_e4m3fn):
    """t * scale, saturated to the format's range and cast to `dtype` (round to nearest even)."""
    fmax = FP8_MAX[dtype]
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


def fp8_matmul(a_q, a_scale_inv, b_q, b_scale_inv, out_dtype=torch.float32):
    """a_q [M, K] @ b_q [K, N] times both dequantizing scales: `torch._scaled_mm` (b_q column-major)."""
    return torch._scaled_mm(a_q, b_q, scale_a=a_scale_inv.reshape(()), scale_b=b_scale_inv.reshape(()),
                            out_dtype=out_dtype)


def fp8_linear(x_q, x_scale_inv, w_q, w_scale_inv, bias, act, out_dtype, out_scale=None, gated=False):
    """The unfused fp8 path: `torch._scaled_mm` of x_q [M, K] and w_q [N, K] (fp32 out), then bias and the
    activation in fp32, then the output cast (an fp8 `out_dtype` quantized with `out_scale`). `gated`:
    w_q is [gate; up] (2F rows) and the output act(g) * u, F wide.

    Returns (out, preact, amax): preact = the fp32 pre-activation, amax = max |out| before the cast.
    """
    acc = fp8_matmul(x_q, x_scale_inv, w_q.t(), w_scale_inv)
    preact = acc if bias is None else acc + bias.float()
    if gated:
        g, u = preact.chunk(2, dim=-1)
        out = activation(g, act) * u
    else:
        out = activation(preact, act)
    amax = out.abs().amax() if out.numel() else out.new_zeros(())
    out = fp8_quantize(out, out_scale, out_dtype) if out_dtype in FP8_MAX else out.to(out_dtype)
    return out, preact, amax


def mlp_shard(x, w1, b1, w2, b2, residual, act, owner, out_dtype, store_for_backward):
    """Eager (partial, h, z) of `ops.mlp_shard`: z = x @ w1.T + b1, h = act(z), partial = h @ w2.T (+ b2 +
    residual where `owner`); h and z empty unless `store_for_backward`."""
    h, z = fused_linear(x, w1, b1, None, act, True, x.dtype, True)
    out, _ = fused_linear(h, w2, b2, residual, 0, owner, out_dtype, False)
    if not store_for_backward:
        h, z = h.new_empty(0), z.new_empty(0)
    return out, h, z


def mlp_shard_backward(grad, x, w1, w2, h, z, act, needs):
    """Eager (dX, dW1, db1, dW2, db2) of `mlp_shard`; None where `needs` says not wanted."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    db2 = grad.sum(0, dtype=torch.float32).to(x.dtype) if need_db2 else None
    grad = grad.to(x.dtype)
    dw2 = grad.t() @ h if need_dw2 else None
    dx, dw1, db1 = fused_linear_backward(grad @ w2, x, w1, z, act, need_dx, need_dw1, need_db1)
    return dx, dw1, db1, dw2, db2


def glu(x, gate, up, gate_bias, up_bias, act):
    """Eager act(x @ gate.T + gate_bias) * (x @ up.T + up_bias): the gated MLP's column stage (one rank's
    [gate_r; up_r] in tensor parallelism), differentiable as eager autograd makes it."""
    return activation(F.linear(x, gate, gate_bias), act) * F.linear(x, up, up_bias)


def glu_backward(grad, gu, act):
    """[dG | dU] [M, 2F] for dH = grad [M, F] and the stored [g | u] [M, 2F]: dG = dH * u * act'(g),
    dU = dH * act(g)."""
    g, u = gu.float().chunk(2, dim=-1)
    grad = grad.float()
    return torch.cat([activation_backward(grad * u, g, act), grad * activation(g, act)], dim=-1).to(gu.dtype)


def _add_linears(module, layers, in_features, hidden_features, out_features, bias, device, dtype):
    """module.<name> = nn.Linear(<from>, <to>) for each (name, from, to) of "in", "hidden", "out" (out: in's
    width when None), built in that order: the order a seed draws their initialisations in."""
    widths = {"in": in_features, "hidden": hidden_features, "out": in_features if out_features is None else out_features}
    for name, source, target in layers:
        setattr(module, name, torch.nn.Linear(widths[source], widths[target], bias, device=device, dtype=dtype))


class MLP(torch.nn.Module):
    """The dense model that `TensorParallelMLP` shards: fc2(gelu(fc1(x))), built fc1 first, then fc2."""

    def __init__(self, in_features, hidden_features, out_features=None, bias=True, approximate="none",
                 device=None, dtype=None):
        super().__init__()
        _add_linears(self, [("fc1", "in", "hidden"), ("fc2", "hidden", "out")], in_features, hidden_features,
                     out_features, bias, device, dtype)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class GatedMLP(torch.nn.Module):
    """The dense model that `TensorParallelGatedMLP` shards, with the names of Llama's MLP:
    down_proj(act(gate_proj(x)) * up_proj(x)), built gate_proj, up_proj, down_proj in that order."""

    def __init__(self, in_features, hidden_features, out_features=None, bias=False, activation="silu",
                 device=None, dtype=None):
        super().__init__()
        _add_linears(self, [("gate_proj", "in", "hidden"), ("up_proj", "in", "hidden"), ("down_proj", "hidden", "out")],
                     in_features, hidden_features, out_features, bias, device, dtype)
        self.activation = activation
        # a module, as transformers' act_fn: what `tpkernels.parallelize` finds by structure
        self.act_fn = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU(),
                       "gelu_tanh": torch.nn.GELU(approximate="tanh")}[activation]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
