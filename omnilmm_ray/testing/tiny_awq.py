"""An AWQ int4 checkpoint of a tiny model, without calibration data.

AWQ's format is plain asymmetric int4 with one scale and zero point per 128 input channels; only AWQ's
search for activation-aware scales needs calibration data, and that changes the numbers, not the format.
So round-to-nearest quantisation of the language model's linears, packed the way AutoAWQ's GEMM kernels
and lmdeploy 0.18 read it (turbomind/weight_format.py AWQFormat: qweight [K, N/8] int32, qzeros
[K/128, N/8] int32, scales [K/128, N] float16, eight 4-bit values per int32 in the order
`_unpack_awq_gemm` undoes), gives a checkpoint TurboMind loads as a real AWQ model does. The vision tower
and the LM head stay float16, as in the published Qwen2.5-VL AWQ checkpoints (`modules_to_not_convert:
["visual"]`). The packing is numpy, so it is tested without torch (tests/test_tiny_awq.py).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GROUP = 128
# Column j of eight sits in nibble AWQ_ORDER.index(j): lmdeploy unpacks nibbles [0, 4, 1, 5, 2, 6, 3, 7]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
QUANT_CONFIG = {
    "bits": 4,
    "group_size": GROUP,
    "modules_to_not_convert": ["visual"],
    "quant_method": "awq",
    "version": "gemm",
    "zero_point": True,
}


def pack(q: np.ndarray) -> np.ndarray:
    """[R, N] values 0..15 -> [R, N/8] int32, AutoAWQ's GEMM order."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    out = np.zeros(q.shape[:2], np.uint32)
    for nibble, col in enumerate(AWQ_ORDER):
        out |= q[:, :, col] << (4 * nibble)
    return out.view(np.int32)


def quantize(w: np.ndarray, group: int = GROUP) -> dict[str, np.ndarray]:
    """An nn.Linear weight [N out, K in] -> {qweight, qzeros, scales}, round to nearest per group of K."""
    n, k = w.shape
    wt = w.astype(np.float32).T.reshape(k // group, group, n)  # [K/g, g, N]
    lo, hi = wt.min(axis=1), wt.max(axis=1)  # [K/g, N]
    scales = np.maximum(hi - lo, 1e-8) / 15
    zeros = np.clip(np.round(-lo / scales), 0, 15)
    q = np.clip(np.round(wt / scales[:, None]) + zeros[:, None], 0, 15).reshape(k, n)
    # C order: min/max over the transposed view leave `scales` in Fortran order, and safetensors.numpy writes an
    # array's memory as it lies, so those scales were saved transposed within each row of groups
    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": np.ascontiguousarray(scales, np.float16)}


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """What lmdeploy computes from the packed tensors (AWQFormat.normalize, then dequant): [K, N] float32."""

    def unpack(x):
        u = x.view(np.uint32)
        nibbles = [(u >> (4 * i)) & 15 for i in range(8)]
        return np.stack([nibbles[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)], axis=-1).reshape(x.shape[0], -1)

    q, z, s = unpack(qweight).astype(np.float32), unpack(qzeros).astype(np.float32), scales.astype(np.float32)
    group = q.shape[0] // s.shape[0]
    return ((q.reshape(-1, group, q.shape[1]) - z[:, None]) * s[:, None]).reshape(q.shape)


def quantize_folder(folder: str | Path) -> Path:
    """Turn a float16 model folder (tiny_families' Qwen2.5-VL) into its AWQ checkpoint, in place."""
    from safetensors.numpy import load_file, save_file

    folder = Path(folder)
    state = load_file(str(folder / "model.safetensors"))
    linear = [k for k in state if LINEAR.match(k)]
    out = {k: w for k, w in state.items() if not LINEAR.match(k)}
    # numpy lets go of the GIL in its array loops: threads quantise a 7B model's ~200 linears on every core
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for key, packed in zip(linear, pool.map(quantize, (state[k] for k in linear))):
            for suffix, t in packed.items():
                out[key[: -len("weight")] + suffix] = t
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder
