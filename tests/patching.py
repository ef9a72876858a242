"""A check that a test's monkeypatch reaches the code it means to change.

`monkeypatch.setattr(module, name, value)` changes what code finds when it looks `name` up through
`module`: a function of that module reading its global, or code elsewhere reading `module.name`. A
name imported with `from module import name` is a separate binding, so patching the module it came from,
or a module that no longer calls it, silently changes nothing and the test still passes. `looked_up`
says whether any tpkernels code reads `name` through `module`; the `monkeypatch` fixture of conftest.py
fails a test that patches a tpkernels module name nothing reads that way.
"""
import dis
import functools
import inspect
import sys
import types

_LOADS_ATTR = {"LOAD_ATTR", "LOAD_METHOD"}


def _code_objects(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions(obj, seen):
    """Every Python function reachable from obj: itself, what it wraps (functools, triton's JIT and
    interpreter, torch's custom ops), and a class's methods."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for f in (obj.fget, obj.fset, obj.fdel):
            if f is not None:
                yield from _functions(f, seen)
        return
    if inspect.isfunction(obj):
        yield obj
    for attr in ("__wrapped__", "fn", "_init_fn", "func"):
        inner = getattr(obj, attr, None) if not isinstance(obj, types.ModuleType) else None
        if inner is not None and (callable(inner) or isinstance(inner, (staticmethod, classmethod))):
            yield from _functions(inner, seen)
    if inspect.isclass(obj) and obj.__module__.startswith("tpkernels"):
        for value in vars(obj).values():
            yield from _functions(value, seen)


@functools.lru_cache(maxsize=None)
def _reads():
    """{(id of the module read through, name)} for every read in tpkernels' code: globals by their
    defining module, and `alias.name` where alias is a module global."""
    reads = set()
    seen = set()
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("tpkernels") or module is None:
            continue
        for value in list(vars(module).values()):
            for fn in _functions(value, seen):
                scope = fn.__globals__
                owner = sys.modules.get(scope.get("__name__"))
                for code in _code_objects(fn.__code__):
                    previous = None
                    for ins in dis.get_instructions(code):
                        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and owner is not None:
                            reads.add((id(owner), ins.argval))
                        elif ins.opname in _LOADS_ATTR and previous is not None and previous.opname == "LOAD_GLOBAL":
                            alias = scope.get(previous.argval)
                            if isinstance(alias, types.ModuleType):
                                reads.add((id(alias), ins.argval))
                        previous = ins
    return frozenset(reads)


def looked_up(module, name):
    """Whether some tpkernels code reads `name` through `module`."""
    return (id(module), name) in _reads()
