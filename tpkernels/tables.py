"""The auto tables: the JSON files that say which backend and which kernel a shape gets, their schema, and
the one reader and writer of each, shared by the package (`ops`, `launch`) and the benchmarks that measure
them (`benchmarks/harness/tables.py`).

    backend_table.json       CUDA tensors: backend="auto"'s rules (`ops.auto_backend`)
    backend_table_cpu.json   CPU tensors: the same, for the native extension against eager
    kernel_table.json        GPU: the kernel (pointer, split-K, TMA) per shape where a run measured one
                             faster than `launch.rule_kernel`'s pick

A backend table: {"source": who measured it, "shapes": what was measured, "rule": how the rules were
derived, "rules": [rule, ...]}. A rule: {"backend"} and optionally "dtypes" (names: "bfloat16"),
"activations" (the kernels' codes), "min_m" and "max_m" (rows, inclusive), "packed" (the CPU packed-weight
cache's state), "min_weight_elements" (K x N); the first rule that matches a call decides it, and a rule
with only "backend" matches everything.

A kernel table: {"source", "rule", "entries": [entry, ...]}, an entry {"layout" (`launch.layout_code`),
"dtype", "m_bucket" (`autotune.bucket`), "n", "k", "kernel"}.
"""
import json
import os

__all__ = ["BACKEND_TABLES", "KERNEL_TABLE", "backend_rule", "kernel_choices", "kernel_entry", "load",
           "rule_matches", "table"]

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND_TABLES = {"cuda": "backend_table.json", "cpu": "backend_table_cpu.json"}
KERNEL_TABLE = "kernel_table.json"
_RULE_KEYS = {"backend", "dtypes", "activations", "min_m", "max_m", "packed", "min_weight_elements"}
_ENTRY_KEYS = ("layout", "dtype", "m_bucket", "n", "k", "kernel")


def load(name):
    """The table in `tpkernels/<name>`, checked against the schema (a ValueError names what is wrong)."""
    with open(os.path.join(HERE, name)) as table_file:
        loaded = json.load(table_file)
    key = "entries" if name == KERNEL_TABLE else "rules"
    if not isinstance(loaded.get(key), list) or "source" not in loaded:
        raise ValueError(f"tpkernels/{name}: a table needs 'source' and a list '{key}'")
    for item in loaded[key]:
        if key == "rules" and ("backend" not in item or set(item) - _RULE_KEYS):
            raise ValueError(f"tpkernels/{name}: a rule needs 'backend' and only {sorted(_RULE_KEYS)}, got {item}")
        if key == "entries" and set(item) != set(_ENTRY_KEYS):
            raise ValueError(f"tpkernels/{name}: an entry has exactly {list(_ENTRY_KEYS)}, got {item}")
    return loaded


def rule_matches(rule, dtype_name, M, activation, packed=False, weight_elements=0):
    """Whether a backend rule covers a call: its dtype's name, rows, activation code, the packed-weight
    cache's state and the weight's K x N."""
    return (dtype_name in rule.get("dtypes", [dtype_name]) and activation in rule.get("activations", [activation])
            and rule.get("min_m", 0) <= M <= rule.get("max_m", M) and rule.get("packed", packed) == packed
            and weight_elements >= rule.get("min_weight_elements", 0))


def backend_rule(backend, dtypes=None, activations=None, min_m=None, max_m=None, **extra):
    """One rule of a backend table (the fields left None are absent: the rule then covers every value)."""
    rule = {"dtypes": dtypes, "activations": activations, "min_m": min_m, "max_m": max_m, **extra}
    rule = {key: value for key, value in rule.items() if value is not None} | {"backend": backend}
    if set(rule) - _RULE_KEYS:
        raise ValueError(f"backend_rule: unknown fields {sorted(set(rule) - _RULE_KEYS)}")
    return rule


def kernel_entry(layout, dtype, m_bucket, n, k, kernel):
    """One entry of the kernel table."""
    return dict(zip(_ENTRY_KEYS, (layout, dtype, m_bucket, n, k, kernel)))


def kernel_choices(loaded):
    """{(layout, dtype, m_bucket, n, k): kernel} of a loaded kernel table."""
    return {tuple(entry[key] for key in _ENTRY_KEYS[:-1]): entry["kernel"] for entry in loaded["entries"]}


def table(source, rule, items, shapes=None, kernel=False):
    """A table to write: a kernel table of `items` (entries) with `kernel`, else a backend table of rules."""
    written = {"source": source}
    if shapes is not None:
        written["shapes"] = shapes
    written["rule"] = rule
    written["entries" if kernel else "rules"] = items
    return written
