"""What each lmdeploy 0.18 engine reads of a checkpoint's quantization_config (config.json or a sub-config):
TurboMind reads it itself (turbomind/converter.py, with the conditions its assertions check), the PyTorch
engine has its own list (pytorch/nn/linear/__init__.py). Used by models.py."""

from __future__ import annotations

# methods each engine reads; TurboMind's further conditions are in `turbomind_reads`
TURBOMIND = ("awq", "gptq", "fp8", "mxfp4", "compressed-tensors")
PYTORCH = ("awq", "smooth_quant", "modelslim_w8a8_static", "fp8")


def summary(config: dict) -> dict | None:
    """The model's quantization_config (top level or a sub-config's), in short: method, bits, group size."""
    q = nested(config, "quantization_config")
    if not q:
        return None
    bits, group = q.get("bits") or q.get("w_bit"), q.get("group_size") or q.get("q_group_size")
    if q.get("quant_method") == "compressed-tensors":
        w = ((q.get("config_groups") or {}).get("group_0") or {}).get("weights") or {}
        bits, group = w.get("num_bits"), w.get("group_size")
    return {
        k: v for k, v in {"method": q.get("quant_method"), "bits": bits, "group_size": group}.items() if v
    }


def nested(config: dict, key: str):
    if key in config:
        return config[key]
    for v in config.values():
        if isinstance(v, dict) and (found := nested(v, key)) is not None:
            return found
    return None


def turbomind_reads(config: dict) -> bool:
    """TurboMind 0.18 builds this checkpoint's quantisation (turbomind/converter.py's assertions)."""
    q = nested(config, "quantization_config")
    if not q:
        return True
    method = q.get("quant_method")
    if method in ("awq", "gptq") and int(q.get("group_size") or 128) != 128:
        return False
    if method == "awq":
        return q.get("version", "gemm") == "gemm"
    if method == "gptq":
        return not q.get("desc_act", False) and q.get("sym", True)
    if method == "compressed-tensors":
        group = (q.get("config_groups") or {}).get("group_0") or {}
        w = group.get("weights") or {}
        return group.get("format") == "pack-quantized" and w.get("num_bits") == 4 and w.get("type") == "int"
    return method in TURBOMIND


def name(q: dict | None) -> str | None:
    """A `summary` as the dry run prints it: "awq int4 (group 128)"."""
    if not q:
        return None
    bits = f" int{q['bits']}" if q.get("bits") else ""
    return q["method"] + bits + (f" (group {q['group_size']})" if q.get("group_size") else "")
