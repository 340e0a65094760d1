"""Model configuration: one dataclass whose fields follow Hugging Face's `DeepseekV3Config`.

The field names are the ones found in a DeepSeek `config.json`, so a checkpoint's config
reads in with `ModelConfig.from_hf_dict` and writes back with `to_hf_dict`. Fields that only
`deepseek_v2` has (`scoring_func`, `topk_method`) are kept here too; what can be derived
(`qk_head_dim`, the YaRN scales) is a property, never stored twice.

Presets: `debug` (tiny, CPU-fast), `demo` (the embedded training demo), `bench-1b` (the training
benchmark shape), `v2-lite` and `v3-671b` (the released shapes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Keys a released or transformers-written config.json may carry that do not change the maths.
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pretraining_tp", "output_router_logits", "aux_loss_alpha", "seq_aux", "ep_size",
    "router_aux_loss_coef", "_name_or_path", "head_dim", "qk_head_dim", "quantization_config",
    "num_experts", "num_local_experts", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "model_type", "rope_parameters", "rope_scaling", "rope_theta", "moe_layer_freq", "mlp_bias",
    "attention_bias", "hidden_act", "attention_dropout", "initializer_range", "_attn_implementation_autoset",
}


@dataclass
class ModelConfig:
    """Shape and numerics of a DeepSeek-V2/V3 model (HF field names)."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 4096  # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 512  # width of one routed expert
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    num_key_value_heads: int = 8  # MLA has no GQA: kept equal to num_attention_heads
    # MLA
    q_lora_rank: int | None = 512  # None: a single q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 64
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" or "group_limited_greedy" (V2)
    first_k_dense_replace: int = 1
    # MTP
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor", ...} or None
    rope_interleave: bool = True  # rotary channels stored as interleaved pairs (V3 checkpoints)
    # misc
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unknown-but-harmless keys

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters, or None when plain RoPE is used."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type", "default"))
        return None if kind == "default" else rs

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None and y.get("mscale_all_dim"):
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"unsupported; use one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be an integer, 0 or more")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise bad("q_lora_rank", "must be a positive integer or None")
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise bad(name, "must be a positive finite number")
        if self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", "MLA needs it equal to num_attention_heads")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise bad("scoring_func", "use 'sigmoid' or 'softmax'")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise bad("topk_method", "use 'noaux_tc', 'greedy' or 'group_limited_greedy'")
        if self.n_routed_experts % self.n_group:
            raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise bad("topk_group", f"must lie in 1..n_group={self.n_group}")
        experts_kept = self.topk_group * self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.num_experts_per_tok > experts_kept:
            raise bad("num_experts_per_tok", f"exceeds the {experts_kept} experts in topk_group groups")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise bad("n_group", "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even")
        if self.model_type == "deepseek_v2" and not self.rope_interleave:
            raise bad("rope_interleave", "deepseek_v2 checkpoints always interleave rotary channels")
        y = self.yarn
        if y is not None:
            kind = y.get("type", y.get("rope_type"))
            if kind != "yarn":
                raise ValueError(f"ModelConfig.rope_scaling type {kind!r} is unsupported; use 'yarn' or None")
            for k in ("factor", "original_max_position_embeddings"):
                if k not in y:
                    raise ValueError(f"ModelConfig.rope_scaling is missing {k!r} (needed for YaRN)")

    # ---------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face `config.json` dict; unsupported values raise, naming the field."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is unsupported; "
                             f"nanoseek reads {SUPPORTED_MODEL_TYPES}")
        checks = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "moe_layer_freq": 1,
                  "attention_dropout": 0.0}
        for key, want in checks.items():
            if key in d and d[key] != want and d[key] is not None:
                raise ValueError(f"{source}: field {key}={d[key]!r} is unsupported (nanoseek needs {want!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        # rope: legacy rope_theta/rope_scaling, or transformers 5's rope_parameters
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            kw["rope_theta"] = rp.get("rope_theta", d.get("rope_theta", 10000.0))
            rt = rp.get("rope_type", "default")
            kw["rope_scaling"] = None if rt == "default" else {
                "type": rt, **{k: v for k, v in rp.items() if k not in ("rope_type", "rope_theta")}}
        if "rope_theta" in d:
            kw["rope_theta"] = d["rope_theta"]
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs.pop("rope_type")
            kw["rope_scaling"] = None if rs.get("type") == "default" else rs
        if model_type == "deepseek_v2":
            kw.setdefault("scoring_func", d.get("scoring_func", "softmax"))
            kw.setdefault("topk_method", d.get("topk_method", "greedy"))
            kw["rope_interleave"] = True
            kw["norm_topk_prob"] = d.get("norm_topk_prob", False)
            kw["num_nextn_predict_layers"] = d.get("num_nextn_predict_layers", 0)
            kw["routed_scaling_factor"] = d.get("routed_scaling_factor", 1.0)
        extra = {}
        for key, value in d.items():
            if key in kw or key in ("rope_scaling", "rope_theta", "rope_parameters"):
                continue
            if key in names:
                kw[key] = value
            elif key in _IGNORED_HF_KEYS:
                extra[key] = value
            else:
                raise ValueError(f"{source}: field {key!r} is not understood by nanoseek; remove it if it "
                                 "does not change the model's maths")
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = 1
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 0
        if "num_key_value_heads" not in kw and "num_attention_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        for key in ("num_nextn_predict_layers",):
            kw[key] = kw.get(key) or 0
        try:
            return cls(**kw, extra=extra)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict that transformers, vLLM and SGLang read."""
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d: dict[str, Any] = {"architectures": [arch]}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            d[f.name] = getattr(self, f.name)
        d.update({"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
                  "moe_layer_freq": 1, "ep_size": 1})
        if self.model_type == "deepseek_v2":
            d.pop("rope_interleave")  # V2 always interleaves; its config has no such field
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: every feature on (q LoRA, groups, MTP, dense + MoE layers), seconds on a CPU
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                  first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=512,
                  initializer_range=0.02),
    # the embedded demo: a small MLA + MoE + MTP model that trains on 2 CPU cores in minutes
    "demo": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                 num_nextn_predict_layers=1, max_position_embeddings=1024, initializer_range=0.02),
    # the training benchmark shape (bench/train_throughput.py, docs/performance.md): ~1.25B total / 0.22B active
    "bench-1b": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
                     num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=512,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8,
                     topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1,
                     num_nextn_predict_layers=1, max_position_embeddings=4096),
    # DeepSeek-V2-Lite's layer shapes (hidden 2048, 16 heads, no q LoRA, 64 experts of 1408 top-6, 2 shared,
    # a dense first layer of 10944), V3 routing, 6 layers + MTP: ~3.7B parameters, AdamW (fp32 master,
    # gradients, moments: 56 GiB) and 8 x 2048-token micro-batches fit on one H200 (the FP8 whole-step bench)
    "bench-2048": dict(vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                       num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                       n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
                       routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
                       max_position_embeddings=4096),
    # DeepSeek-V2-Lite (15.7B / 2.4B)
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                    num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                    norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
                    first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=163840,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                    bos_token_id=100000, eos_token_id=100001),
    # DeepSeek-V3 / R1 (671B / 37B)
    "v3-671b": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, first_k_dense_replace=3, num_nextn_predict_layers=1,
                    max_position_embeddings=163840,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                    bos_token_id=0, eos_token_id=1),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional field overrides, e.g. `preset("debug", hidden_size=128)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
