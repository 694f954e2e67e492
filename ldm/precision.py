"""Which autocast precision `train.mixed_precision` means on this machine.

`auto` picks bf16 where the hardware multiplies bf16 natively: every CUDA device ldm trains on, and CPUs with
AVX512-BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere it picks fp32: a CPU without those instructions
converts bf16 to fp32 around every matmul, which is slower than fp32 and less accurate. `no`, `bf16` and `fp16` are
taken as they are. The loop logs the choice and its reason in the run header.

Inference uses the same detection (`resolve_inference_precision`): sample.precision for the sampler's network and
the tokenizer's decoder (`ldm sample`, training grids, periodic FID) and `ldm cache-latents --precision` for the
tokenizer's encoder; each logs its choice and reason. FID's feature extractors always run in fp32.

Nothing here imports from the rest of ldm.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flags of native bf16 dot products: x86 (AVX512-BF16, AMX-BF16) and Arm ("bf16" in Features)
_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_BF16_FLAGS = frozenset({"bf16"})


def _cpuinfo_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: torch's own probes (AVX512-BF16, AMX; private, so looked up with
    getattr) or, where torch has none, the /proc/cpuinfo flags."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    flags = _cpuinfo_flags()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    return bool(flags & (_ARM_BF16_FLAGS if arm else _X86_BF16_FLAGS))


def resolve_mixed_precision(setting: str, device_type: str) -> tuple[str, str]:
    """(accelerate's mixed_precision: "bf16" | "fp16" | "no", why) for train.mixed_precision=`setting` on a
    `device_type` ("cuda", "cpu", ...) device."""
    if setting != "auto":
        return setting, f"train.mixed_precision={setting}"
    return _auto(device_type)


def resolve_inference_precision(setting: str, device_type: str, key: str) -> tuple[str, str]:
    """("bf16" | "fp32", why) for an inference precision setting ("auto" | "fp32" | "bf16", named `key` in the
    reason, e.g. sample.precision): the networks that sample and the tokenizer that encodes or decodes run under
    bf16 autocast, or in fp32. `auto` is the same choice as train.mixed_precision=auto."""
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{key}={setting!r}; expected one of ['auto', 'fp32', 'bf16']")
    if setting != "auto":
        return setting, f"{key}={setting}"
    mode, why = _auto(device_type)
    return ("bf16" if mode == "bf16" else "fp32"), why


def _auto(device_type: str) -> tuple[str, str]:
    """What `auto` means on a `device_type` device: ("bf16" | "no", why)."""
    if device_type == "cuda":
        return "bf16", "auto: bf16 on CUDA"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16", "auto: this CPU multiplies bf16 natively (AVX512-BF16 / AMX / Arm BF16)"
    if device_type == "cpu":
        return "no", ("auto: fp32, this CPU has no native bf16 matmul (AVX512-BF16 / AMX / Arm BF16), so bf16 would "
                      "be emulated and slower")
    return "no", f"auto: fp32 on {device_type}"


def inference_autocast(mode: str, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device_type` for mode "bf16" (a resolved inference precision), a no-op for "fp32"."""
    if mode == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
