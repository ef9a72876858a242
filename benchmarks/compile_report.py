"""Compile every kernel the package can launch for sm_90a and sm_80, read what ptxas made of it, and gate.

No GPU is needed: triton ships ptxas and nvdisasm. For every kernel, launch mode, dtype, target and
config the autotuner could try there, the report gives:

- registers, spill stores and the stack frame (from `ptxas -v`), and any C75xx warning (C7515: wgmma
  serialized, each instruction followed by a full wait);
- shared memory against the device's limit;
- the matrix instructions (HGMMA = wgmma, HMMA = mma.sync), whether wgmma reads A from registers, TMA
  (UTMALDG / UTMASTG);
- the mainloop: SASS instructions per K-tile of the innermost MMA loop (conditional regions with no MMA
  in them, the flattened persistent loop's epilogue, left out), its MUFU count, and its ratio to a plain
  Triton GEMM (`plain_gemm.py`) of the same family compiled with the same tile, layouts, dtype and
  target;
- the issue-slot bound: tensor-core cycles per K-tile over issue cycles per K-tile (warps x mainloop
  instructions / 4 schedulers), capped at 1. Below 1, the mainloop cannot keep the tensor cores fed.

The gate (`--gate`, run in CI) fails when a config that the autotuner can pick on Hopper, for a bf16,
fp16 or fp8 (e4m3) kernel, spills, has a C75xx warning, lacks the wgmma (QGMMA for fp8) the plain GEMM
has, reads wgmma's A from registers where the plain GEMM does not, or has a mainloop over 1.5x the
plain GEMM's; and when any kept config needs more shared memory than its target has. The fp8 modes are
the MLP's launches (`column_fwd_fp8`, `row_fwd_fp8`; the backward's e5m2 x e4m3 `dgrad_dgelu_fp8` and
`wgrad_fp8`, plain dgrad being wgrad's layout), on sm_90a only.

    python benchmarks/compile_report.py                     # everything, a table, JSON lines with --json
    python benchmarks/compile_report.py --gate              # what CI runs (sm_90a, bf16, fp16 and fp8)
    PYTHONPATH=/path/to/triton36 python benchmarks/compile_report.py --gate   # another triton

Run it without TRITON_INTERPRET (the interpreter replaces kernels with Python functions).
"""
import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_gemm import _plain_matmul_kernel, _plain_persistent_tma_kernel  # noqa: E402
from tpkernels.kernels import (  # noqa: E402
    DGELU_BLOCK_M,
    DGELU_BLOCK_N,
    DGELU_NUM_WARPS,
    GELU,
    GLU,
    IDENTITY,
    SILU,
    _dgelu_kernel,
    _matmul_kernel,
    _quantize_kernel,
    _scale_update_kernel,
    _matmul_splitk_kernel,
    _matmul_tma_persistent_kernel,
    configs,
)

MAINLOOP_RATIO_LIMIT = 1.5
# A promoted fp8 GEMM (K >= launch.FP8_PROMOTE_K) adds each K-tile's product into the accumulator after
# waiting for its wgmma: 1.56-2.08x the plain GEMM's mainloop on the tiles it may run (triton 3.6 and 3.9).
PROMOTED_RATIO_LIMIT = 2.5
NUM_SMS = 132
TARGETS = {"sm90": 90, "sm80": 80}
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
# Triton's names for the dtypes (fp8: e4m3, torch.float8_e4m3fn).
TRITON_TYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp8": "fp8e4nv"}
# Dense tensor-core FMAs per SM per clock, for the issue-slot bound (fp32 runs as tf32, at half rate).
FMA_PER_CLOCK = {"sm90": 2048, "sm80": 1024}

# Launch modes. Strides are given per operand as (row stride, column stride): "1" a unit stride, "D" a
# stride divisible by 16; None for an operand the mode does not touch. a_trans / b_trans say which
# layout a TMA descriptor covers (the transposed one when the operand's unit stride is its row stride).
MODES = {
    "column_fwd": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), p=("D", "1"),
                       meta=dict(ACTIVATION=GELU, HAS_BIAS=True, STORE_PREACT=True)),
    "row_fwd": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), r=("D", "1"),
                    meta=dict(HAS_BIAS=True, HAS_RESIDUAL=True)),
    "row_fwd_fp32": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), r=("D", "1"), out="fp32",
                         meta=dict(HAS_BIAS=True, HAS_RESIDUAL=True)),
    "dgrad": dict(a=("D", "1"), b=("D", "1"), c=("D", "1"), meta={}),
    "wgrad": dict(a=("1", "D"), b=("D", "1"), c=("D", "1"), meta={}),
    "dgrad_dgelu": dict(a=("D", "1"), b=("D", "1"), c=("D", "1"), z=("D", "1"), meta=dict(GRAD_ACTIVATION=GELU)),
    # fp8 (dtype "fp8" only, sm_90a only): the MLP's column stage quantizes h in its epilogue (scales, bias,
    # GELU, amax, the e4m3 store; z stored in bf16), and the row stage reads h in e4m3 (bf16 partials).
    "column_fwd_fp8": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), p=("D", "1"), out="fp8", bias="bf16",
                           preact="bf16", fp8=True,
                           meta=dict(ACTIVATION=GELU, HAS_BIAS=True, STORE_PREACT=True, SCALED=True, QUANTIZE=True,
                                     STORE_AMAX=True)),
    # the same at K >= launch.FP8_PROMOTE_K (Llama-3-8B's hidden 4096): each K-tile's product promoted into the
    # fp32 accumulator (`kernels.matmul._dot`)
    "column_fwd_fp8_promoted": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), p=("D", "1"), out="fp8", bias="bf16",
                                    preact="bf16", fp8=True, precision="fp8_promoted",
                                    meta=dict(ACTIVATION=GELU, HAS_BIAS=True, STORE_PREACT=True, SCALED=True,
                                              QUANTIZE=True, STORE_AMAX=True)),
    "row_fwd_fp8": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), out="bf16", bias="bf16", fp8=True,
                        meta=dict(HAS_BIAS=True, SCALED=True)),
    # the fp8 backward: e5m2 gradients times e4m3 weights (transposed copies, K-major) or activations
    "dgrad_dgelu_fp8": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), z=("D", "1"), a_type="fp8e5", out="bf16",
                            preact="bf16", fp8=True, meta=dict(GRAD_ACTIVATION=GELU, SCALED=True)),
    "wgrad_fp8": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), a_type="fp8e5", out="bf16", fp8=True,
                      meta=dict(SCALED=True)),
    # the same at K >= launch.FP8_PROMOTE_K (a step of 4096 tokens or more): each K-tile's product promoted
    # into the fp32 accumulator (`kernels.matmul._dot`)
    "wgrad_fp8_promoted": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), a_type="fp8e5", out="bf16", fp8=True,
                               precision="fp8_promoted", meta=dict(SCALED=True)),
    # the gated MLP (pointer and split-K kernels only): its column stage reads x once for gate and up (two
    # accumulators; [g | u] stored for the backward), and its dH GEMM writes [dG | dU]. Their plain GEMM is
    # one of twice the tile's width: the same MMA work per K step.
    "gated_fwd": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), p=("D", "1"), gated=True,
                      meta=dict(ACTIVATION=GLU + SILU, STORE_PREACT=True)),
    "dgrad_dglu": dict(a=("D", "1"), b=("D", "1"), c=("D", "1"), z=("D", "1"), meta=dict(GRAD_ACTIVATION=GLU + SILU)),
    # the gated MLP in fp8: h = silu(g) * u quantized in the epilogue, and [dG | dU] from e5m2 dY
    "gated_fwd_fp8": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), p=("D", "1"), out="fp8", preact="bf16",
                          fp8=True, gated=True,
                          meta=dict(ACTIVATION=GLU + SILU, STORE_PREACT=True, SCALED=True, QUANTIZE=True,
                                    STORE_AMAX=True)),
    "dgrad_dglu_fp8": dict(a=("D", "1"), b=("1", "D"), c=("D", "1"), z=("D", "1"), a_type="fp8e5", out="bf16",
                           preact="bf16", fp8=True, meta=dict(GRAD_ACTIVATION=GLU + SILU, SCALED=True)),
}
KERNELS = ("matmul", "matmul_tma", "matmul_splitk", "dgelu", "fp8_quantize", "fp8_scale_update")
MATMULS = ("matmul", "matmul_tma", "matmul_splitk")
# The elementwise kernels: one variant each, of the dtype given ("fp8": the fp8 helpers, sm_90a only).
ELEMENTWISE = {"dgelu": lambda dtype, target: dtype != "fp8",
               "fp8_quantize": lambda dtype, target: dtype == "fp8" and target == "sm90",
               "fp8_scale_update": lambda dtype, target: dtype == "fp8" and target == "sm90"}
# The split-K kernel serves decode shapes: every launch but dW, whose K (the tokens) is never long there.
SPLITK_MODES = ("column_fwd", "row_fwd", "row_fwd_fp32", "dgrad", "dgrad_dgelu", "column_fwd_fp8",
                "column_fwd_fp8_promoted", "row_fwd_fp8",
                "dgrad_dgelu_fp8", "gated_fwd", "dgrad_dglu", "gated_fwd_fp8", "dgrad_dglu_fp8")
# The modes the TMA kernel has no form of (the launcher runs the pointer or split-K kernel).
POINTER_ONLY_MODES = ("dgrad_dglu", "gated_fwd_fp8", "dgrad_dglu_fp8")
EPILOGUE_DEFAULTS = dict(ACTIVATION=IDENTITY, GRAD_ACTIVATION=IDENTITY, HAS_BIAS=False, HAS_RESIDUAL=False,
                         STORE_PREACT=False, SCALED=False, QUANTIZE=False, STORE_AMAX=False, INT64_OFFSETS=False,
                         EMULATE_BF16=False, SPLIT_ORDER=0)

# The fp8 scales are fp32 scalars; amax is passed as its int32 view (the atomic max runs on the bits).
SCALE_POINTERS = dict(a_scale_ptr="fp32", b_scale_ptr="fp32", c_scale_ptr="fp32", amax_ptr="i32")


def _tools_dir():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def kernel_configs(kernel, mode, dtype, target):
    """The configs the launcher lets the autotuner try for this kernel, mode, dtype and target."""
    capability = (TARGETS[target] // 10, TARGETS[target] % 10)
    limit = configs.shared_memory_limit(capability)
    if (dtype == "fp8") != MODES[mode].get("fp8", False):
        return []  # fp8 modes take fp8 operands, the others 16- or 32-bit ones
    if dtype == "fp8" and (target != "sm90" or kernel == "matmul_tma"):
        return []  # fp8 tensor cores are Hopper's (sm_89 up); the TMA kernel is 16-bit only
    gated = MODES[mode].get("gated", False)
    promoted = MODES[mode].get("precision") == "fp8_promoted"
    if kernel == "matmul_tma":
        spec = MODES[mode]
        if target != "sm90" or dtype == "fp32" or spec.get("out", dtype) != dtype or mode in POINTER_ONLY_MODES:
            return []  # the launcher's rule: Hopper, 16-bit operands and output
        return configs.prune(configs.GATED_TMA_TILES if gated else configs.TMA_CONFIGS, ELEMENT_SIZE[dtype], limit,
                             store_element_size=ELEMENT_SIZE[spec.get("out", dtype)],
                             grad_activation="GRAD_ACTIVATION" in spec["meta"] or gated, gated=gated,
                             promoted=promoted)
    if kernel == "matmul_splitk":
        if mode not in SPLITK_MODES:
            return []
        return configs.prune(configs.splitk_configs(capability), ELEMENT_SIZE[dtype], limit, gated=gated,
                             promoted=promoted)
    return configs.prune(configs.matmul_configs(capability), ELEMENT_SIZE[dtype], limit, gated=gated,
                         promoted=promoted)


def _signature(fn, values, pointer_types, descriptors=()):
    """ASTSource arguments: constexprs by value, unit strides as constexpr 1, the rest divisible by 16."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in values:
            signature[name], constexprs[(index,)] = "constexpr", values[name]
        elif name in descriptors:
            signature[name] = descriptors[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{pointer_types.get(name, pointer_types['default'])}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _layout(spec):
    """launch.layout_code of a mode's A and B: 0 row-major, 1 column-major, 2 neither; A plus 3x B."""
    def one(pair):
        return 0 if pair[1] == "1" else 1 if pair[0] == "1" else 2

    return one(spec["a"]) + 3 * one(spec["b"])


def _stride_values(names, spec):
    """Constexpr values for the unit strides and the unused operands' zero strides."""
    values = {}
    for name, pair in zip(names, spec):
        for stride_name, kind in zip(name, pair or ("0", "0")):
            if kind in ("1", "0"):
                values[stride_name] = int(kind)
    return values


def _matmul_source(mode, dtype, config, kernel=_matmul_kernel):
    spec = MODES[mode]
    values = dict(EPILOGUE_DEFAULTS, **spec["meta"], **config.kwargs(), LAYOUT=_layout(spec),
                  INPUT_PRECISION=spec.get("precision", "ieee" if dtype == "fp32" else "tf32"))
    values.update(_stride_values(
        [("stride_am", "stride_ak"), ("stride_bk", "stride_bn"), ("stride_cm", "stride_cn"),
         ("stride_rm", "stride_rn"), ("stride_pm", "stride_pn"), ("stride_zm", "stride_zn")],
        [spec["a"], spec["b"], spec["c"], spec.get("r"), spec.get("p"), spec.get("z")]))
    out = TRITON_TYPE[spec.get("out", dtype)]
    return _signature(kernel, values, dict(default=TRITON_TYPE[dtype], a_ptr=spec.get("a_type", TRITON_TYPE[dtype]),
                                           c_ptr=out, residual_ptr=out,
                                           bias_ptr=TRITON_TYPE[spec.get("bias", dtype)],
                                           preact_ptr=TRITON_TYPE[spec.get("preact", dtype)],
                                           z_ptr=TRITON_TYPE[spec.get("preact", dtype)],
                                           workspace_ptr="fp32", counter_ptr="i32", **SCALE_POINTERS))


def _layout_flags(spec):
    # A descriptor covers the operand as stored: A.T when A's unit stride is its row stride.
    return spec["a"][0] == "1", spec["b"][0] == "1"


def _descriptor(dtype, rows, cols):
    return f"tensordesc<{dtype}[{rows}, {cols}]>"


def _operand_descriptors(spec, dtype, out, config, slices):
    a_trans, b_trans = _layout_flags(spec)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    return dict(
        a_desc=_descriptor(dtype, *((bk, bm) if a_trans else (bm, bk))),
        b_desc=_descriptor(dtype, *((bn, bk) if b_trans else (bk, bn))),
        c_desc=_descriptor(out, bm, bn // slices),
    )


def _matmul_tma_source(mode, dtype, config):
    spec = MODES[mode]
    a_trans, b_trans = _layout_flags(spec)
    values = dict(EPILOGUE_DEFAULTS, **spec["meta"], **config.kwargs(), A_TRANS=a_trans, B_TRANS=b_trans,
                  NUM_SMS=NUM_SMS, INPUT_PRECISION=spec.get("precision", "tf32"), LAYOUT=_layout(spec))
    values.update(_stride_values([("stride_rm", "stride_rn"), ("stride_pm", "stride_pn"), ("stride_zm", "stride_zn")],
                                 [spec.get("r"), spec.get("p"), spec.get("z")]))
    out = spec.get("out", dtype)
    slices = config.epilogue_slices(spec["meta"].get("GRAD_ACTIVATION", IDENTITY) != IDENTITY or spec.get("gated", False))
    descriptors = _operand_descriptors(spec, dtype, out, config, slices)
    return _signature(_matmul_tma_persistent_kernel, values, dict(default=dtype, residual_ptr=out, **SCALE_POINTERS),
                      descriptors)


def _plain_source(kernel, mode, dtype, config):
    spec = MODES[mode]
    width = 2 if spec.get("gated") else 1  # a gated tile does the MMA work of one twice as wide
    tile = dict(BLOCK_M=config.block_m, BLOCK_N=width * config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m)
    out = spec.get("out", dtype)
    if kernel == "matmul_tma":
        a_trans, b_trans = _layout_flags(spec)
        descriptors = _operand_descriptors(spec, dtype, out, dataclasses.replace(config, block_n=tile["BLOCK_N"]), 1)
        return _signature(_plain_persistent_tma_kernel, dict(tile, A_TRANS=a_trans, B_TRANS=b_trans, NUM_SMS=NUM_SMS),
                          dict(default=dtype), descriptors)
    values = dict(tile)
    values.update(_stride_values([("stride_am", "stride_ak"), ("stride_bk", "stride_bn"), ("stride_cm", "stride_cn")],
                                 [spec["a"], spec["b"], spec["c"]]))
    return _signature(_plain_matmul_kernel, values, dict(default=TRITON_TYPE[dtype], c_ptr=TRITON_TYPE[out],
                                                         a_ptr=spec.get("a_type", TRITON_TYPE[dtype])))


def _quantize_source():
    values = dict(STORE_AMAX=True, INT64_OFFSETS=False, EMULATE_BF16=False, BLOCK_M=32, BLOCK_N=128, stride_xn=1,
                  stride_qn=1)
    return _signature(_quantize_kernel, values, dict(default="bf16", q_ptr="fp8e4nv", scale_ptr="fp32", amax_ptr="i32"))


def _scale_update_source():
    values = dict(LENGTH=16, COUNT=4, MARGIN=0, MOST_RECENT=False, BLOCK_L=16, BLOCK_C=4)
    return _signature(_scale_update_kernel, values, dict(default="fp32"))


def _dgelu_source(dtype):
    values = dict(GRAD_ACTIVATION=GELU, STORE_COLSUM=True, INT64_OFFSETS=False, EMULATE_BF16=False,
                  BLOCK_M=DGELU_BLOCK_M, BLOCK_N=DGELU_BLOCK_N, stride_dyn=1, stride_zn=1, stride_dzn=1)
    return _signature(_dgelu_kernel, values, dict(default=dtype, colsum_ptr="fp32"))


# ---------------------------------------------------------------------------------------------------
# Compiling and reading the result


def _compile(source, target, num_warps, num_stages):
    log = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
    return kernel, log.getvalue(), time.time() - start


def _ptxas_report(log):
    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_store_bytes=number(r"(\d+) bytes spill stores"),
        spill_load_bytes=number(r"(\d+) bytes spill loads"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        warnings=sorted(set(re.findall(r"\((C75\d\d)\)", log))),
        warning_text=[line.strip() for line in log.splitlines() if re.search(r"\(C75\d\d\)", line)],
    )


def _sass(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_tools_dir(), "nvdisasm"), "-c", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr.strip()}")
    return out.stdout


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(\.\w+)*\s+`?\(?(\.L_x_\d+)")
_MMA = re.compile(r"^(@!?U?P\w+\s+)?(HGMMA|HMMA|QGMMA)\b")


def parse_sass(text):
    """Instructions (opcode text) and label positions of a one-function SASS listing."""
    instructions, labels = [], {}
    for line in text.splitlines():
        line = line.strip()
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _INSTRUCTION.search(line)
        if found:
            instructions.append(found.group(1))
    return instructions, labels


def mainloop(instructions, labels):
    """The innermost loop holding a matrix instruction: (start, stop) indices, and the instructions of
    its steady state: the loop body less the regions that a forward branch inside it skips and that hold
    no matrix instruction (the flattened persistent loop's epilogue, say)."""
    loops = []
    for index, text in enumerate(instructions):
        branch = _BRANCH.match(text)
        if branch and labels.get(branch.group(3), index + 1) <= index:
            start = labels[branch.group(3)]
            if any(_MMA.match(t) for t in instructions[start:index + 1]):
                loops.append((index - start, start, index))
    if not loops:
        return None
    _, start, stop = min(loops)
    skipped = set()
    for index in range(start, stop):
        branch = _BRANCH.match(instructions[index])
        if not branch or branch.group(3) not in labels:
            continue
        target = labels[branch.group(3)]
        if index < target <= stop and not any(_MMA.match(t) for t in instructions[index + 1:target]):
            skipped.update(range(index + 1, target))
    body = [t for i, t in enumerate(instructions[start:stop + 1], start) if i not in skipped]
    return start, stop, body


def _opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def sass_report(cubin):
    instructions, labels = parse_sass(_sass(cubin))
    opcodes = [_opcode(t) for t in instructions]
    hgmma = [t for t in instructions if _opcode(t).startswith(("HGMMA", "QGMMA"))]  # QGMMA: fp8 wgmma
    report = dict(
        instructions=len(instructions),
        wgmma=bool(hgmma),
        mma_sync=any(op.startswith("HMMA") for op in opcodes),
        # HGMMA Rd, A, B, C: A is a descriptor (shared memory) or a register
        wgmma_a_from_registers=any(re.match(r"\S+\s+R\d+,\s+R\d+", re.sub(r"^@!?U?P\w+\s+", "", t)) for t in hgmma),
        tma_loads=sum(op.startswith("UTMALDG") for op in opcodes),
        tma_stores=sum(op.startswith("UTMASTG") for op in opcodes),
    )
    loop = mainloop(instructions, labels)
    if loop is None:
        report.update(mainloop_instructions=None, mainloop_mma=0, mainloop_mufu=0)
    else:
        _, _, body = loop
        report.update(mainloop_instructions=len(body),
                      mainloop_mma=sum(bool(_MMA.match(t)) for t in body),
                      mainloop_mufu=sum(_opcode(t).startswith("MUFU") for t in body))
    return report


def _issue_bound(config, dtype, target, mainloop_instructions):
    if not mainloop_instructions:
        return None
    rate = FMA_PER_CLOCK[target] * {"fp32": 0.5, "fp8": 2}.get(dtype, 1)
    mma_cycles = config.block_m * config.block_n * config.block_k / rate
    issue_cycles = config.num_warps * mainloop_instructions / 4
    return round(min(1.0, mma_cycles / issue_cycles), 3)


def _source(kernel, mode, dtype, config):
    if kernel == "matmul":
        return _matmul_source(mode, dtype, config)
    if kernel == "matmul_tma":
        return _matmul_tma_source(mode, dtype, config)
    if kernel == "matmul_splitk":
        return _matmul_source(mode, dtype, config, _matmul_splitk_kernel)
    if kernel == "fp8_quantize":
        return _quantize_source()
    if kernel == "fp8_scale_update":
        return _scale_update_source()
    return _dgelu_source(dtype)


def compile_variant(variant):
    """One report row: the kernel, and for matmuls the plain GEMM beside it."""
    kernel, mode, dtype, target, config = variant
    capability = (TARGETS[target] // 10, TARGETS[target] % 10)
    if kernel not in MATMULS:
        warps, stages = DGELU_NUM_WARPS, 1
    else:
        warps, stages = config.num_warps, config.num_stages
    compiled, log, seconds = _compile(_source(kernel, mode, dtype, config), target, warps, stages)
    row = dict(kernel=kernel, mode=mode, dtype=dtype, target=target, triton=triton.__version__,
               config=None if config is None else config.__dict__, compile_s=round(seconds, 2),
               shared_bytes=compiled.metadata.shared, shared_limit=configs.shared_memory_limit(capability))
    row.update(_ptxas_report(log))
    row.update(sass_report(compiled.asm["cubin"]))
    if kernel in MATMULS:
        plain, plain_log, _ = _compile(_plain_source(kernel, mode, dtype, config), target, warps, stages)
        plain_sass = sass_report(plain.asm["cubin"])
        row.update(plain_mainloop_instructions=plain_sass["mainloop_instructions"], plain_wgmma=plain_sass["wgmma"],
                   plain_wgmma_a_from_registers=plain_sass["wgmma_a_from_registers"],
                   plain_spill_store_bytes=_ptxas_report(plain_log)["spill_store_bytes"])
        ours, theirs = row["mainloop_instructions"], row["plain_mainloop_instructions"]
        row["mainloop_ratio"] = round(ours / theirs, 3) if ours and theirs else None
        row["issue_bound"] = _issue_bound(config, dtype, target, ours)
        row["plain_issue_bound"] = _issue_bound(config, dtype, target, theirs)
    return row


def gate_failures(row):
    """Why this row fails the gate (an empty list when it passes)."""
    failures = []
    if row["shared_bytes"] > row["shared_limit"]:
        failures.append(f"needs {row['shared_bytes']} bytes of shared memory, the device has {row['shared_limit']}")
    if row["target"] != "sm90" or row["dtype"] not in ("bf16", "fp16", "fp8"):
        return failures
    if row["kernel"] in MATMULS and row.get("plain_wgmma") and not row["wgmma"]:
        failures.append("no wgmma (HGMMA, or QGMMA for fp8) in the SASS; the plain GEMM has it")
    if row["spill_store_bytes"]:
        failures.append(f"spills {row['spill_store_bytes']} bytes")
    # A promoted fp8 GEMM waits for each K-tile's wgmma before adding its product (C7517): that wait is the
    # promotion, and so is a mainloop up to PROMOTED_RATIO_LIMIT; anything else fails as elsewhere.
    promoted = MODES.get(row.get("mode"), {}).get("precision") == "fp8_promoted"
    warnings = [w for w in row["warnings"] if not (promoted and w == "C7517")]
    if warnings:
        failures.append("ptxas " + ", ".join(warnings) + ": " + " | ".join(row["warning_text"])[:300])
    if row["kernel"] not in MATMULS:
        return failures
    if row["wgmma_a_from_registers"] and not row["plain_wgmma_a_from_registers"]:
        failures.append("wgmma reads A from registers; the plain GEMM reads it from shared memory")
    if row["mainloop_ratio"] is None:
        failures.append("no mainloop with a matrix instruction found")
    elif row["mainloop_ratio"] > (PROMOTED_RATIO_LIMIT if promoted else MAINLOOP_RATIO_LIMIT):
        failures.append(f"mainloop {row['mainloop_instructions']} instructions, "
                        f"{row['mainloop_ratio']}x the plain GEMM's {row['plain_mainloop_instructions']}")
    return failures


def _config_name(config):
    if config is None:
        return "-"
    c = config
    name = f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
    return name + (f" sub{c['epilogue_subtile']}" if c["epilogue_subtile"] > 1 else "")


def _mma(row):
    return "wgmma" + ("(A:regs)" if row["wgmma_a_from_registers"] else "") if row["wgmma"] else \
        "mma.sync" if row["mma_sync"] else "-"


def table(rows):
    header = ("| kernel | mode | dtype | target | config | regs | spill B | smem / limit | C75xx | mma | TMA ld/st "
              "| mainloop (plain) | ratio | MUFU | issue bound (plain) | gate |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        mainloop = "-" if r["mainloop_instructions"] is None else \
            f"{r['mainloop_instructions']} ({r.get('plain_mainloop_instructions', '-')})"
        bound = "-" if r.get("issue_bound") is None else f"{r['issue_bound']:.2f} ({r['plain_issue_bound']:.2f})"
        failures = gate_failures(r)
        lines.append(
            f"| {r['kernel']} | {r['mode']} | {r['dtype']} | {r['target']} | {_config_name(r['config'])} | "
            f"{r['registers']} | {r['spill_store_bytes']} | {r['shared_bytes']} / {r['shared_limit']} | "
            f"{','.join(r['warnings']) or '-'} | {_mma(r)} | {r['tma_loads']}/{r['tma_stores']} | {mainloop} | "
            f"{r.get('mainloop_ratio') or '-'} | {r['mainloop_mufu']} | {bound} | "
            f"{'FAIL: ' + '; '.join(failures) if failures else 'ok'} |")
    return "\n".join(lines)


def variants(kernels, modes, dtypes, targets):
    out = []
    for target in targets:
        for dtype in dtypes:
            for kernel in kernels:
                if kernel in ELEMENTWISE:
                    if ELEMENTWISE[kernel](dtype, target):
                        out.append((kernel, kernel, dtype, target, None))
                    continue
                for mode in modes:
                    out.extend((kernel, mode, dtype, target, config)
                               for config in kernel_configs(kernel, mode, dtype, target))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(ELEMENT_SIZE), help="default: all; bf16 and fp8 with --gate")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="default: all; sm90 with --gate")
    parser.add_argument("--gate", action="store_true",
                        help="sm_90a, bf16 and fp8 (unless given), and exit 1 on any gate failure")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    parser.add_argument("--json", help="write the rows to this file as JSON lines")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary, not the table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("compile_report.py compiles for GPUs: run it without TRITON_INTERPRET=1")
    # ptxas's own report (-v) is printed by triton when this is set, and only on a cold compile: a private
    # cache directory makes every compile cold. The worker processes inherit both.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpkernels-compile-report-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless it is set
    # The gate compiles bf16 and fp8: fp16 runs the same tiles and wgmma as bf16 (in the 2026-12-04 reports
    # their rows had the same mainloops, registers within 4), and CI compiles the gate twice (triton 3.6, 3.9).
    args.dtypes = args.dtypes or (["bf16", "fp8"] if args.gate else list(ELEMENT_SIZE))
    args.targets = args.targets or (["sm90"] if args.gate else list(TARGETS))

    todo = variants(args.kernels, args.modes, args.dtypes, args.targets)
    print(f"triton {triton.__version__}: compiling {len(todo)} variants on {args.jobs} processes", flush=True)
    rows, errors = [], []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.imap(_compile_or_error, todo)
        for number, (variant, result) in enumerate(zip(todo, results), 1):
            kernel, mode, dtype, target, config = variant
            what = f"{kernel} {mode} {dtype} {target} {_config_name(None if config is None else config.__dict__)}"
            if isinstance(result, str):
                errors.append(f"{what}: {result}")
                print(f"[{number}/{len(todo)}] {what}: COMPILE FAILED {result}", flush=True)
                continue
            rows.append(result)
            failures = gate_failures(result)
            if args.quiet and not failures:
                continue
            print(f"[{number}/{len(todo)}] {what}: {result['registers']} regs, spill {result['spill_store_bytes']}, "
                  f"mainloop {result['mainloop_instructions']} vs {result.get('plain_mainloop_instructions')}"
                  f"{' FAIL ' + '; '.join(failures) if failures else ''}", flush=True)
    markdown = table(rows)
    if not args.quiet:
        print(markdown)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown + "\n")
    failed = [r for r in rows if gate_failures(r)]
    print(f"triton {triton.__version__}: {len(rows)} compiled, {len(errors)} failed to compile, "
          f"{len(failed)} fail the gate")
    for error in errors:
        print("compile error:", error, file=sys.stderr)
    if errors or (args.gate and failed):
        return 1
    return 0


def _compile_or_error(variant):
    try:
        return compile_variant(variant)
    except Exception as error:  # reported per variant, then the run fails
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


if __name__ == "__main__":
    sys.exit(main())
