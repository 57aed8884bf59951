"""JSON that keeps NaN and Inf.

Standard JSON has no NaN or Infinity, and those values are the very data this
tool exists for. We write a non-finite float as the strings "NaN", "Infinity"
and "-Infinity" (the spellings JavaScript's Number() and Python's float() both
parse), and read them back as floats where a float is expected.
"""
from __future__ import annotations

import json
import math
from typing import Any

_SPELLING = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_nonfinite(value: Any) -> Any:
    """Return `value` with every non-finite float (also inside lists/dicts) spelled as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): encode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_nonfinite(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return encode_nonfinite(value.item())  # numpy scalar
    if hasattr(value, "tolist"):
        return encode_nonfinite(value.tolist())  # numpy array
    return value


def decode_nonfinite(value: Any) -> Any:
    """Inverse of `encode_nonfinite`: turn the three spellings back into floats."""
    if isinstance(value, str) and value in _SPELLING:
        return _SPELLING[value]
    if isinstance(value, dict):
        return {k: decode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_nonfinite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Standard JSON (`allow_nan=False`) with non-finite floats spelled as strings."""
    return json.dumps(encode_nonfinite(value), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """Parse JSON written by `dumps`, turning the non-finite spellings back into floats."""
    return decode_nonfinite(json.loads(text))
