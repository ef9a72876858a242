"""The safetensors side of checkpoints, knowing nothing of models: reading a checkpoint's files and
headers, writing a file one tensor at a time, and putting a finished checkpoint in place atomically.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape
and byte range in the data, which it covers end to end), and the data. `header` builds it before any
tensor exists, so a writer streams the tensors in after it.
"""
import contextlib
import ctypes
import json
import os
import re
import shutil
import struct
import tempfile

import torch

# safetensors' dtype names, as get_slice(...).get_dtype() gives them.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# max_shard_size's units, transformers' notation: decimal KB / MB / GB, binary KiB / MiB / GiB.
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(size):
    """max_shard_size in bytes: a positive int, or transformers' notation ("5GB" = 5 * 10**9 bytes,
    "500MiB" = 500 * 2**20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper()) if isinstance(size, str) else None
        if match is None or (match.group(2) or "") not in _SIZE_UNITS:
            raise ValueError(f"save_sharded: max_shard_size={size!r} is not a size; give bytes (an int) or "
                             f"transformers' notation such as '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"save_sharded: max_shard_size={size!r} must be positive")
    return value


def read_index(path):
    """{tensor name: file} of a safetensors checkpoint: a file, an index json, or a folder holding either.
    A missing or unreadable index, or a file it names that is not there, is a ValueError naming it."""
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                return read_index(os.path.join(path, name))
        raise ValueError(f"load_sharded: {path} holds neither model.safetensors nor model.safetensors.index.json")
    if not os.path.exists(path):
        raise ValueError(f"load_sharded: {path} does not exist")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"load_sharded: the index {path} cannot be read ({type(error).__name__}: {error}); "
                             f"it is not a transformers index (a JSON object with a weight_map)") from None
        folder = os.path.dirname(path)
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        absent = sorted({file for file in files.values() if not os.path.exists(file)})
        if absent:
            names = sorted(name for name, file in files.items() if file == absent[0])
            raise ValueError(f"load_sharded: the index {path} names {len(absent)} file(s) that are not there: "
                             f"{', '.join(absent[:4])} (holding {', '.join(names[:4])}{' ...' if len(names) > 4 else ''})")
        return files
    with open_file(path) as f:
        return {name: path for name in f.keys()}


@contextlib.contextmanager
def open_file(file):
    """safetensors' safe_open, with a file it cannot read (truncated, corrupt header) as a ValueError."""
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="pt")
    except Exception as error:  # SafetensorError, OSError
        raise ValueError(f"load_sharded: {file} cannot be read as safetensors ({error}): it is truncated, "
                         f"corrupt or not a safetensors file") from None
    with handle as f:
        yield f


def header(entries):
    """A safetensors header for these entries, in order, padded to 8 bytes: (header bytes, data bytes)."""
    table, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        table[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_tensor(f, tensor):
    """The bytes of a contiguous CPU tensor, written without a copy (no numpy needed)."""
    if tensor.numel():
        f.write(memoryview((ctypes.c_ubyte * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())))


def staging_folder(path):
    """A new temporary folder beside `path`, where rank 0 writes the checkpoint."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=parent)


def fsync(path):
    """Flush a file, or a folder's entries, to the disk: a rename is durable only after what it names
    is, and after the folder that holds it (a power cut could otherwise leave a renamed, empty file)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish(path, staging, names, groups, index, config):
    """Check every written file, add the index and the config, flush them all to the disk, then move the
    checkpoint into place: an existing one is untouched until the new one is whole, then replaced as a
    whole, and the folder holding it is flushed after the move."""
    for name, group in zip(names, groups):
        check_written(os.path.join(staging, name), group)
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if path.endswith(".safetensors"):
        fsync(os.path.join(staging, names[0]))
        os.replace(os.path.join(staging, names[0]), target)  # atomic on one filesystem
        fsync(parent)
        shutil.rmtree(staging)
        return
    if index is not None:
        weight_map = {entry.name: name for name, group in zip(names, groups) for entry in group}
        total = sum(entry.nbytes for group in groups for entry in group)
        with open(os.path.join(staging, os.path.basename(index)), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(staging)
    if os.path.isdir(target):
        _carry_over(target, staging)
    for name in os.listdir(staging):
        if os.path.isfile(os.path.join(staging, name)):
            fsync(os.path.join(staging, name))
    fsync(staging)
    if os.path.isdir(target):  # the old folder moves aside, the new one in, then the old one goes
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.replace(target, old)
        os.replace(staging, target)
        fsync(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
        fsync(parent)


def _is_checkpoint_file(name):
    return name == "model.safetensors.index.json" or (name.startswith("model") and name.endswith(".safetensors"))


def _carry_over(old, new):
    """Files in the old folder that are not the checkpoint's own (a tokenizer, say) go into the new one,
    as hard links where the filesystem allows, so that replacing the folder loses nothing else."""
    for name in os.listdir(old):
        source, destination = os.path.join(old, name), os.path.join(new, name)
        if _is_checkpoint_file(name) or os.path.exists(destination):
            continue
        if os.path.isdir(source):
            shutil.copytree(source, destination, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, destination)


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def check_written(file, entries):
    """The file just written holds every entry with its shape and dtype, and its size is its header's
    (a short write or a full disk that did not raise would fail here)."""
    head, data = header(entries)
    size = os.path.getsize(file)
    if size != len(head) + data:
        raise OSError(f"{file} is {size} bytes, its header says {len(head) + data}")
    with open_file(file) as f:
        names = set(f.keys())
        if names != {entry.name for entry in entries}:
            raise OSError(f"{file} holds {len(names)} tensors, {len(entries)} were written")
        for entry in entries:
            if tuple(f.get_slice(entry.name).get_shape()) != entry.shape:
                raise OSError(f"{file}: {entry.name} reads back as {f.get_slice(entry.name).get_shape()}, "
                              f"{entry.shape} was written")
