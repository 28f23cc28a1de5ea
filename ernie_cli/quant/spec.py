"""What is quantized and how: the `quantization_config` block of config.json, parsed and written.

The block describes the checkpoint completely, so a reader needs nothing else:

    "quantization_config": {
      "quant_method": "ernie_cli", "format_version": 1,
      "format": "int4", "bits": 4, "group_size": 64, "symmetric": false,
      "modules": {"attention": "int4", "dense_mlp": "int4", "shared_experts": "int4",
                  "experts": "int4", "embeddings": "int8"},
      "not_quantized": [...],
      "int8": {...how an int8 weight is stored...}, "int4": {...how an int4 weight is stored...},
      "scale_dtype": "bfloat16", "refinement": {"method": "hqq-lsq", "steps": 4}
    }

Each module class maps to "int8", "int4" or null (kept in the model's float dtype). The router
(gate weight and e_score_correction_bias), the norms and any biases are never quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ernie_cli.errors import ErnieError, UsageError
from ernie_cli.quant.formats import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_REFINE_STEPS,
    GROUP_SIZES,
)

QUANT_METHOD = "ernie_cli"
FORMAT_VERSION = 1
FORMATS = ("int8", "int4")
MODULE_CLASSES = ("attention", "dense_mlp", "shared_experts", "experts", "embeddings")

_CLASSES = [
    (re.compile(r"^(embed_tokens|lm_head)\.weight$"), "embeddings"),
    (re.compile(r"^layers\.\d+\.self_attn\.[qkvo]_proj\.weight$"), "attention"),
    (re.compile(r"^layers\.\d+\.mlp\.(gate_up_proj|down_proj)\.weight$"), "dense_mlp"),
    (re.compile(r"^layers\.\d+\.mlp\.shared_experts\.(gate_up_proj|down_proj)\.weight$"), "shared_experts"),
    (re.compile(r"^layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$"), "experts"),
]

_STORAGE = {
    "int8": {
        "qweight": "int8 [..., out, in]: round(W / scale) clamped to [-127, 127]",
        "scales": "scale_dtype [..., out]: max |W| of the row / 127",
        "dequantize": "W = qweight * scales[..., None]",
    },
    "int4": {
        "qweight": "uint8 [..., out, in/2]: codes 0..15, two per byte along the input dimension, "
        "column 2j in the low nibble and column 2j+1 in the high nibble",
        "scales": "scale_dtype [..., out, ceil(in/group_size)]",
        "zeros": "scale_dtype [..., out, ceil(in/group_size)]: the float value of code 8",
        "dequantize": "W[..., o, i] = (code[..., o, i] - 8) * scales[..., o, i // group_size] + zeros[..., o, i // group_size]",
    },
}

NOT_QUANTIZED = [
    "input_layernorm, post_attention_layernorm and norm weights",
    "the MoE router: mlp.gate.weight and mlp.gate.e_score_correction_bias (float32)",
    "biases",
]


@dataclass(frozen=True)
class QuantSpec:
    format: str  # the main format: "int8" or "int4"
    group_size: int = DEFAULT_GROUP_SIZE  # of int4 weights
    modules: dict[str, str | None] = field(default_factory=dict)
    refine_steps: int = DEFAULT_REFINE_STEPS

    @classmethod
    def make(cls, fmt: str, group_size: int | None = None, keep_embeddings: bool = False, refine_steps: int = DEFAULT_REFINE_STEPS) -> "QuantSpec":
        if fmt not in FORMATS:
            raise UsageError(f"unknown quantization format {fmt!r}: use int8 or int4.")
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if group_size not in GROUP_SIZES:
            raise UsageError(f"--group-size {group_size} is not supported: use 32, 64 or 128.")
        modules: dict[str, str | None] = {name: fmt for name in MODULE_CLASSES}
        modules["embeddings"] = None if keep_embeddings else "int8"
        return cls(fmt, group_size, modules, refine_steps)

    def format_of(self, param: str) -> str | None:
        """The format of one of our parameters (state_dict name), or None if it stays float."""
        for pattern, cls_name in _CLASSES:
            if pattern.match(param):
                return self.modules.get(cls_name)
        return None

    def to_config(self) -> dict[str, Any]:
        used = set(v for v in self.modules.values() if v)
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "format": self.format,
            "bits": 8 if self.format == "int8" else 4,
            "group_size": self.group_size if "int4" in used else None,
            "symmetric": self.format == "int8",
            "modules": dict(self.modules),
            "not_quantized": NOT_QUANTIZED,
            "tensor_names": "<our parameter name>.qweight / .scales / .zeros for quantized weights; "
            "<our parameter name> for the rest (fused gate_up_proj with gate rows first, routed experts stacked [E, out, in])",
            "scale_dtype": "bfloat16",
            **{fmt: _STORAGE[fmt] for fmt in FORMATS if fmt in used},
            "refinement": {
                "method": "hqq-lsq" if self.refine_steps and "int4" in used else "rtn",
                "steps": self.refine_steps if "int4" in used else 0,
            },
        }

    @classmethod
    def from_config(cls, raw: Any, where: str = "config.json") -> "QuantSpec":
        def bad(why: str) -> ErnieError:
            return ErnieError(f"{where}: quantization_config {why}; re-create the checkpoint with `ernie quantize`.")

        if not isinstance(raw, dict):
            raise bad("is not an object")
        method = raw.get("quant_method")
        if method != QUANT_METHOD:
            raise ErnieError(
                f"{where}: quantization_config.quant_method is {method!r}; only checkpoints made by `ernie quantize` "
                f"({QUANT_METHOD!r}) can be loaded, so quantize the original bf16 checkpoint with it."
            )
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise bad(f"has format_version {version!r}, this ernie reads {FORMAT_VERSION}")
        fmt = raw.get("format")
        if fmt not in FORMATS:
            raise bad(f"has format {fmt!r}, not int8 or int4")
        modules = raw.get("modules")
        if not isinstance(modules, dict) or set(modules) != set(MODULE_CLASSES):
            raise bad(f"needs modules with exactly {', '.join(MODULE_CLASSES)}")
        for name, value in modules.items():
            if value not in (None, *FORMATS):
                raise bad(f"maps {name} to {value!r}, not int8, int4 or null")
        group = raw.get("group_size")
        if "int4" in modules.values() and (not isinstance(group, int) or group < 2 or group % 2):
            raise bad(f"has group_size {group!r}, not an even integer")
        if raw.get("scale_dtype", "bfloat16") != "bfloat16":
            raise bad(f"has scale_dtype {raw.get('scale_dtype')!r}, not bfloat16")
        steps = (raw.get("refinement") or {}).get("steps", 0)
        return cls(fmt, group if isinstance(group, int) else DEFAULT_GROUP_SIZE, dict(modules), int(steps or 0))
