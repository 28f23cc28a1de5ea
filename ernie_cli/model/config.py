"""config.json of the ERNIE 4.5 text families, in either of its two published styles.

Baidu's original release files carry keys transformers ignores (auto_map, moe_capacity, moe_gate,
use_rmsnorm, a top-level rope_theta, ...); files rewritten for transformers 5 carry
`rope_parameters` and may use the aliases `num_experts` / `num_experts_per_tok`. Both describe the
same network (docs of it: ../shared/docs/ernie-architecture.md §1), so both are read into one
ErnieConfig. Defaults are transformers' class defaults, so a file means what it means there.
Anything the runtime cannot reproduce exactly is refused with the offending key named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ernie_cli.errors import ErnieError

MOE_ARCH = "Ernie4_5_MoeForCausalLM"
DENSE_ARCH = "Ernie4_5ForCausalLM"
_FAMILIES = {MOE_ARCH: "ernie4_5_moe", DENSE_ARCH: "ernie4_5"}


@dataclass(frozen=True)
class ErnieConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    use_bias: bool = False
    is_moe: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str | None = None
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def architecture(self) -> str:
        return MOE_ARCH if self.is_moe else DENSE_ARCH

    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: every `interval`-th layer inside [start, end] is MoE, the rest dense."""
        return (
            self.is_moe
            and (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def replace(self, **changes: Any) -> "ErnieConfig":
        from dataclasses import replace

        return replace(self, **changes)

    # ---- parameter counting (used by bench and the memory estimate) -------------------------

    def _attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return h * d * self.num_attention_heads * 2 + h * d * self.num_key_value_heads * 2

    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token active parameters, by the shapes alone (tied head counted once)."""
        h = self.hidden_size
        embed = self.vocab_size * h
        norms = (2 * self.num_hidden_layers + 1) * h
        total = embed + norms + (0 if self.tie_word_embeddings else embed)
        active = embed + norms  # the head GEMV reads the whole matrix each token
        for i in range(self.num_hidden_layers):
            layer = self._attention_params()
            if self.is_moe_layer(i):
                expert = 3 * h * self.moe_intermediate_size
                shared = 3 * h * self.moe_intermediate_size * self.num_shared_experts
                router = (h + 1) * self.num_experts  # weight and correction bias
                total += layer + self.num_experts * expert + shared + router
                active += layer + self.num_experts_per_tok * expert + shared + router
            else:
                mlp = 3 * h * self.intermediate_size
                total += layer + mlp
                active += layer + mlp
        return {"total": total, "active": active}


def _refuse(key: str, why: str) -> ErnieError:
    return ErnieError(f"config.json: {key} {why}; this is not a supported ERNIE 4.5 text model config.")


def _int(raw: dict, key: str, default: Any = None, *aliases: str, minimum: int = 1) -> int:
    for name in (key, *aliases):
        if raw.get(name) is not None:
            value = raw[name]
            break
    else:
        if default is None:
            raise ErnieError(f"config.json has no {key}, and it has no default: the file is incomplete, re-download it.")
        value = default
    if isinstance(value, (list, tuple)) and len(value) == 1:  # some Baidu files wrap per-modality values
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise _refuse(f"{key}.rope_type", f"is {kind!r}, but only plain (default) RoPE is implemented")
        if block.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(f"{key}.partial_rotary_factor", "must be 1.0")
    theta = params.get("rope_theta", raw.get("rope_theta", 500000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise _refuse("rope_theta", f"must be a positive number, got {theta!r}")
    return float(theta)


def parse_config(raw: dict[str, Any]) -> ErnieConfig:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    arch = next((a for a in archs if a in _FAMILIES), None)
    if arch is None and model_type in _FAMILIES.values():
        arch = MOE_ARCH if model_type == "ernie4_5_moe" else DENSE_ARCH
    if arch is None:
        shown = archs[0] if archs else model_type
        raise ErnieError(
            f"config.json: architectures/model_type is {shown!r}, not an ERNIE 4.5 text model "
            f"({MOE_ARCH} or {DENSE_ARCH}); point -m at an ERNIE 4.5 checkpoint."
        )
    if model_type is not None and model_type != _FAMILIES[arch]:
        raise _refuse("model_type", f"is {model_type!r} but architectures says {arch}")
    is_moe = arch == MOE_ARCH

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", f"is {act!r}; ERNIE 4.5 uses silu")

    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if raw.get("head_dim") is None and hidden % heads:
        raise _refuse("num_attention_heads", f"({heads}) must divide hidden_size ({hidden}) when head_dim is absent")
    head_dim = _int(raw, "head_dim", hidden // heads)
    if heads % kv_heads:
        raise _refuse("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
    if head_dim % 2:
        raise _refuse("head_dim", f"({head_dim}) must be even for rotary embeddings")
    layers = _int(raw, "num_hidden_layers")

    moe: dict[str, Any] = {}
    if is_moe:
        experts = _int(raw, "moe_num_experts", None, "num_experts")
        k = _int(raw, "moe_k", None, "num_experts_per_tok")
        if k > experts:
            raise _refuse("moe_k", f"({k}) must not exceed moe_num_experts ({experts})")
        end = raw.get("moe_layer_end_index", -1)
        if isinstance(end, (list, tuple)) and len(end) == 1:
            end = end[0]
        end = layers - 1 if end == -1 else end
        if not isinstance(end, int) or not 0 <= end < layers:
            raise _refuse("moe_layer_end_index", f"must be -1 or a layer index below {layers}, got {end!r}")
        moe = dict(
            num_experts=experts,
            num_experts_per_tok=k,
            moe_intermediate_size=_int(raw, "moe_intermediate_size"),
            num_shared_experts=_int(raw, "moe_num_shared_experts", 2, minimum=0),
            moe_layer_start_index=_int(raw, "moe_layer_start_index", 1, minimum=0),
            moe_layer_end_index=end,
            moe_layer_interval=_int(raw, "moe_layer_interval", 1),
            moe_norm_min=float(raw.get("moe_norm_min", 1e-12)),
        )

    eps = raw.get("rms_norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise _refuse("rms_norm_eps", f"must be a positive number, got {eps!r}")
    return ErnieConfig(
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=_int(raw, "max_position_embeddings", 131072),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        use_bias=bool(raw.get("use_bias", False)),
        is_moe=is_moe,
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        quantization=raw.get("quantization_config"),
        **moe,
    )


def load_config(model_dir: Path) -> ErnieConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ErnieError(f"{model_dir} has no config.json: it is not a model directory; pass -m a directory holding an ERNIE 4.5 checkpoint.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ErnieError(f"{path} is not readable JSON ({exc}); re-download the model.") from None
    if not isinstance(raw, dict):
        raise ErnieError(f"{path} is not a JSON object; re-download the model.")
    return parse_config(raw)
