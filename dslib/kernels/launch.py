"""What every kernel wrapper checks before it launches (chapter 6): device, dtypes, the interpreter's quirks.

Kept apart from the kernels so that each kernel file shows only its maths.
"""
from __future__ import annotations

import functools
import warnings

import torch

from dslib.kernels import interpreting


def require_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one CUDA device (any device under `TRITON_INTERPRET=1`); returns it. Raises a clear error
    otherwise: the kernels never run silently on the wrong device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}.")
    if first.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"dslib.kernels run on CUDA tensors, got tensors on {first}. Use the PyTorch path (backend='torch'), "
            "or set TRITON_INTERPRET=1 before the kernels are imported to run them (slowly) in Triton's CPU "
            "interpreter."
        )
    if interpreting():
        fix_interpreter()
    return first


def require_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}, got {t.dtype}.")


def pow2_block(n: int, *, least: int = 16) -> int:
    """The tile width covering a dimension of n: the next power of two, at least 16 (`tl.dot` needs >= 16)."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (4 under the interpreter: small split counts for tests)."""
    if device.type != "cuda":
        return 4
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def fix_interpreter() -> None:
    """Two numeric bugs of Triton's CPU interpreter (3.9), fixed here for the tests; no effect on the GPU.

    - `tl.dot` of bf16 operands multiplies their raw 16-bit patterns (bf16 is stored as uint16 and handed to
      numpy): widen them to fp32 first, which is exact and what the tensor cores do (fp32 accumulation).
    - fp32 -> fp8 e4m3 rounds half up and drops the carry into the exponent (126.2 becomes 64): convert with
      torch instead (round to nearest even, as the GPU's `cvt.rn` does).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not all(hasattr(builder, n) for n in ("create_dot", "create_fp_to_fp", "cast_impl")):
        warnings.warn("dslib.kernels: this Triton's interpreter has another layout; bf16 dots and fp8 rounding are "
                      "not patched (interpreter results may be wrong; the GPU is unaffected).", stacklevel=2)
        return
    create_dot, create_fp_to_fp = builder.create_dot, builder.create_fp_to_fp

    def dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, d, *args, **kwargs)

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16):
            wide = src if src.dtype.scalar == tl.float32 else self.cast_impl(src, tl.float32)
            x = torch.from_numpy(np.ascontiguousarray(wide.data, dtype=np.float32))
            data = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(data, tl.float8e4nv)
        return create_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot, builder.create_fp_to_fp = dot, fp_to_fp
