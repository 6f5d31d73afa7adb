"""Tensors in JSON, exactly: raw little-endian bytes in base64 with dtype and shape (`mopd serve`'s own scoring
endpoint and its client). Why not lists of numbers: a float32 that goes through a decimal string and back is exact
only if every step prints enough digits, and a batch of top-k is large; bytes are exact and a quarter the size."""

from __future__ import annotations

import base64

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "bool": torch.bool}


def encode(t: torch.Tensor) -> dict:
    array = t.detach().cpu().contiguous().numpy()
    name = next(n for n, d in DTYPES.items() if d == t.dtype)
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(raw).decode()}


def decode(obj) -> torch.Tensor:
    """The tensor `encode` wrote; ValueError (in words) for anything else."""
    if not (isinstance(obj, dict) and obj.get("dtype") in DTYPES and isinstance(obj.get("shape"), list)
            and isinstance(obj.get("data"), str)):
        raise ValueError("not an encoded tensor ({dtype, shape, data})")
    dtype = DTYPES[obj["dtype"]]
    np_dtype = np.dtype(str(torch.empty(0, dtype=dtype).numpy().dtype)).newbyteorder("<")
    raw = base64.b64decode(obj["data"], validate=True)
    shape = [int(s) for s in obj["shape"]]
    if len(raw) != int(np.prod(shape)) * np_dtype.itemsize:
        raise ValueError(f"{len(raw)} bytes for shape {shape} of {obj['dtype']}")
    array = np.frombuffer(raw, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape).copy())
