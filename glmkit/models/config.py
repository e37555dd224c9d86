"""Model configuration: one dataclass for the GLM family, read from and written to `config.json`.

The field names are the official ChatGLM-6B `config.json` keys, so a directory glmkit writes loads in
the official code and vice versa. Keys glmkit adds (prefixed by nothing special, ignored by the
official code's `**kwargs`) make implicit official behaviour explicit, like the residual scale.
No torch import here: the config is data, importable by tools that never build a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# The official ChatGLM-6B blocks are built without `num_layers`, so they all use the default depth
# of 28 for the DeepNorm residual scale, whatever the model's real depth. Models that must load in
# the official code follow the same rule.
OFFICIAL_ALPHA_DEPTH = 28

# "gelu": ChatGLM-6B's tanh-approximated GELU; "geglu": GLM-130B's x1 * gelu(x2) with the exact erf GELU;
# "swiglu": ChatGLM2/3 and GLM-4's silu(x1) * x2. The gated ones have dense_h_to_4h twice inner_hidden_size wide.
MLP_TYPES = ("gelu", "geglu", "swiglu")
# "neox": ChatGLM-6B / GLM-130B: the two halves of the rotated dims pair up, inv_freq rounded to fp16 as their
# official code does; "interleaved": ChatGLM2/3, GLM-4 and transformers' glm/glm4: adjacent dims (2i, 2i+1) pair
# up, angles in fp32 (GPT-J style), on the first partial_rotary_factor of each head.
ROTARY_STYLES = ("neox", "interleaved")
DTYPES = ("float32", "float16", "bfloat16")


OPTIONAL_TOKEN_IDS = ("smask_token_id", "text_eos_token_id")
# glmkit keys left out of config.json at these values (GLM-130B's additions).
# The architecture switches of ChatGLM2 and later are written only when they differ from ChatGLM-6B's, so
# ChatGLM-6B and GLM-130B configs stay byte for byte what they were.
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "rmsnorm": False, "apply_residual_connection_post_layernorm": True, "post_layer_norm": True,
    "multi_query_group_num": None, "kv_channels": None, "add_bias_linear": True, "add_qkv_bias": False,
    "rotary_style": "neox", "partial_rotary_factor": 1.0, "rotary_position_interpolation": 1.0,
    "sandwich_norm": False, "causal": False,
    "additional_eos_token_ids": [],
}
OPTIONAL_KEYS: dict[str, Any] = {"smask_token_id": None, "text_eos_token_id": None, "rotary_table_fp16": False,
                                  "quantization_embedding_bit": 0, **ARCHITECTURE_DEFAULTS}


class ConfigError(ValueError):
    """A config.json that glmkit cannot use, with the reason."""


@dataclass
class GLMConfig:
    """Hyper-parameters of a GLM model; defaults are the released ChatGLM-6B's."""

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3
    # GLM-130B's icetk vocabulary has two more ids that matter: [sMASK] (a sentence blank) and the
    # text tokenizer's `</s>`, which ends generation as <eop> does. Unset (None) for ChatGLM-6B.
    smask_token_id: int | None = None
    text_eos_token_id: int | None = None
    torch_dtype: str = "float16"
    tie_word_embeddings: bool = True
    # glmkit's explicit versions of what the official code fixes implicitly.
    residual_alpha: float = math.sqrt(2 * OFFICIAL_ALPHA_DEPTH)
    rotary_base: float = 10000.0
    # Linear position interpolation: positions are divided by this before the rotary angles (ChatGLM2-6B-32K's
    # rope_ratio, base 10000; ChatGLM3-32k/128k and GLM-4 scale rotary_base instead). 1: none.
    rotary_position_interpolation: float = 1.0
    mlp_type: str = "gelu"
    # SwissArmyTransformer (GLM-130B) builds the rotary cos/sin table in fp16 whatever the model's dtype:
    # inv_freq, positions, their products and cos/sin are all rounded to fp16. Matching it moves fp32
    # logits by up to ~1 on long prompts.
    rotary_table_fp16: bool = False
    # Weight-only quantization of the block linears (glmkit/quant/quantize.py): 0 (none), 8 or 4, the
    # official key; the group size is glmkit's (0: one scale per row, as the official checkpoints).
    # The architecture of ChatGLM2/ChatGLM3/GLM-4 (THUDM's config keys, which vLLM reads too; transformers'
    # glm/glm4 configs are mapped onto them by their family). The defaults are ChatGLM-6B's.
    rmsnorm: bool = False  # RMSNorm (weight only) instead of LayerNorm (weight and bias), everywhere
    # True: the residual is the normalised input (times residual_alpha: DeepNorm, ChatGLM-6B); False: the block's
    # input (pre-norm, ChatGLM2 and later; residual_alpha is not used).
    apply_residual_connection_post_layernorm: bool = True
    post_layer_norm: bool = True  # final_layernorm after the last block
    # Key/value heads of grouped-query attention, with the fused QKV blockwise [all q | all k | all v]; None:
    # one per query head, fused per head [q_h | k_h | v_h] (ChatGLM-6B, and THUDM's multi_query_attention false).
    multi_query_group_num: int | None = None
    kv_channels: int | None = None  # the head dim; None: hidden_size // num_attention_heads
    add_bias_linear: bool = True  # bias on every block linear
    add_qkv_bias: bool = False  # bias on query_key_value even without add_bias_linear
    rotary_style: str = "neox"  # ROTARY_STYLES
    partial_rotary_factor: float = 1.0  # the part of each head (of each half, in 2D) that rotates
    # GLM-4-0414 (Glm4ForCausalLM): an RMSNorm on each sublayer's output before the residual add.
    sandwich_norm: bool = False
    causal: bool = False  # plain causal attention, positions 0, 1, 2, ... (ChatGLM2 and later)
    # More ids that end generation as eos_token_id does (GLM-4's config.json lists three).
    additional_eos_token_ids: list[int] = field(default_factory=list)
    quantization_bit: int = 0
    quantization_group_size: int = 0
    # glmkit's: 8 stores the word embedding (and the tied output layer with it) as INT8 rows, one scale
    # per token. (The official int4-qe variant packs it to INT4 under the key quantization_embeddings.)
    quantization_embedding_bit: int = 0
    # P-Tuning v2 (official keys): a trained prefix of `pre_seq_len` keys/values in front of every
    # layer's attention, from an embedding, or from an MLP over it with `prefix_projection`.
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # Keys we do not interpret (architectures, auto_map, ...) are kept and written back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: the GQA groups, or one per query head."""
        return self.multi_query_group_num or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head (of each half of it, with 2D positions) that rotate."""
        return int((self.head_dim // 2 if self.position_encoding_2d else self.head_dim) * self.partial_rotary_factor)

    @property
    def position_layout(self) -> str:
        """The name of the model's position layout (glmkit.models.positions.LAYOUTS)."""
        if self.causal:
            return "causal"
        return "2d-prefix-lm" if self.position_encoding_2d else "1d-prefix-lm"

    def validate(self) -> None:
        """Fail at load time, naming the field, rather than deep inside a matmul."""
        check_types(self)
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.position_encoding_2d and self.head_dim % 4:
            raise ConfigError(f"2D rotary positions need a head dim divisible by 4, got {self.head_dim}")
        if self.multi_query_group_num is not None and (
                self.multi_query_group_num < 1 or self.num_attention_heads % self.multi_query_group_num):
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"multi_query_group_num {self.multi_query_group_num} (the key/value heads)")
        if self.rotary_style not in ROTARY_STYLES:
            raise ConfigError(f"rotary_style {self.rotary_style!r} is not one of {ROTARY_STYLES}")
        if self.rotary_dim % 2 or self.rotary_dim < 2 or self.partial_rotary_factor > 1:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} of a head of {self.head_dim} "
                              "does not give an even number of rotary dims")
        if self.rotary_position_interpolation <= 0:
            raise ConfigError(f"rotary_position_interpolation {self.rotary_position_interpolation} must be positive "
                              "(positions are divided by it)")
        if self.rotary_position_interpolation != 1 and self.rotary_style != "interleaved":
            raise ConfigError("rotary_position_interpolation is implemented for the interleaved rotary only "
                              "(ChatGLM2-6B-32K's); no ChatGLM-6B or GLM-130B release uses it")
        if self.causal and self.position_encoding_2d:
            raise ConfigError("causal models have 1D positions: set position_encoding_2d false")
        if self.mlp_type not in MLP_TYPES:
            raise ConfigError(f"mlp_type {self.mlp_type!r} is not one of {MLP_TYPES}")
        if self.quantization_bit not in (0, 4, 8):
            raise ConfigError(f"quantization_bit {self.quantization_bit} is not 0, 4 or 8")
        if self.quantization_embedding_bit not in (0, 4, 8):
            raise ConfigError(f"quantization_embedding_bit {self.quantization_embedding_bit} is not 0, 4 or 8")
        if self.pre_seq_len is not None and self.pre_seq_len < 1:
            raise ConfigError(f"pre_seq_len must be a positive number of prefix tokens or null, not {self.pre_seq_len}")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not one of {DTYPES}")
        # A causal model's positions ignore <sop> and the mask tokens, so only the ids it generates with are checked.
        shaping = () if self.causal else ("bos_token_id", "mask_token_id", "gmask_token_id")
        for name in (*shaping, "eos_token_id", "pad_token_id", *OPTIONAL_TOKEN_IDS):
            token = getattr(self, name)
            if token is not None and not 0 <= token < self.vocab_size:
                raise ConfigError(f"{name} {token} is outside the vocabulary (vocab_size {self.vocab_size})")
        for token in self.additional_eos_token_ids:
            if not 0 <= token < self.vocab_size:
                raise ConfigError(f"eos id {token} is outside the vocabulary (vocab_size {self.vocab_size})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLMConfig:
        """glmkit's config from its own keys (a family's config.json goes through glmkit.families first)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known and k != "extra"}
        if kwargs.get("inner_hidden_size") is None:
            kwargs["inner_hidden_size"] = 4 * kwargs.get("hidden_size", cls.hidden_size)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"invalid config: {e}") from e

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The tokens that end a generated answer: <eop>, GLM-130B's `</s>` too, and any further eos ids."""
        more = () if self.text_eos_token_id is None else (self.text_eos_token_id,)
        return (self.eos_token_id, *more, *self.additional_eos_token_ids)

    def to_dict(self) -> dict[str, Any]:
        """Keys GLM-130B added are written only when set, so ChatGLM-6B configs stay as they were."""
        data = {k: v for k, v in asdict(self).items()
                if k != "extra" and not (k in OPTIONAL_KEYS and v == OPTIONAL_KEYS[k])}
        # A family's own model_type (kept in extra when read) survives the round trip; glmkit's is "chatglm".
        return {**self.extra, "model_type": self.extra.get("model_type", "chatglm"), **data}

    @classmethod
    def from_json_file(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        try:
            return cls.from_dict(read_json(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def save(self, directory: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        (Path(directory) / "config.json").write_text(text, encoding="utf-8")


# What each annotation of GLMConfig accepts from JSON. bos_token_id may be null: transformers' GlmConfig has none.
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
NULLABLE = ("bos_token_id",)


def _accepts(kind: type, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _shown(value: Any) -> str:
    kind = {str: "the string", list: "the list", dict: "the object", bool: "", type(None): ""}.get(type(value), "")
    return f"{kind} {json.dumps(value, default=str)[:40]}".strip()


def check_types(config: GLMConfig) -> None:
    """Every field holds the JSON type its annotation names (`hidden_size: "256"` fails here, by name)."""
    for f in fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        annotation = str(f.type)
        optional = annotation.endswith("| None") or f.name in NULLABLE
        if value is None and optional:
            continue
        if annotation.startswith("list[int]"):
            if not isinstance(value, list) or not all(_accepts(int, v) for v in value):
                raise ConfigError(f"{f.name} must be a list of integers, not {_shown(value)}")
            continue
        kind = {"int": int, "float": float, "bool": bool, "str": str}[annotation.removesuffix(" | None")]
        if not _accepts(kind, value):
            raise ConfigError(f"{f.name} must be {_NAMES[kind]}{' or null' if optional else ''}, not {_shown(value)}")


def read_json(path: Path) -> Any:
    """A config file's JSON, or a ConfigError that says how to repair it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the original download") from e


def glm130b_architecture(num_layers: int, **sizes: Any) -> dict[str, Any]:
    """GLM-130B's fixed choices around the sizes that its launch script passes (SwissArmyTransformer's
    checkpoints carry no config). DeepNorm's alpha really follows the depth here: sqrt(2 * num_layers)."""
    fixed = dict(
        position_encoding_2d=False, mlp_type="geglu", rotary_table_fp16=True, tie_word_embeddings=True,
        # icetk: 20000 image tokens, then the text pieces; the commands from 150000 on.
        mask_token_id=150000, gmask_token_id=150001, smask_token_id=150002, bos_token_id=150004,
        eos_token_id=150005, text_eos_token_id=20002, pad_token_id=0,
    )
    return {**fixed, "num_layers": num_layers, "residual_alpha": math.sqrt(2 * num_layers), **sizes}


# Named presets, as plain dicts. https://huggingface.co/THUDM/chatglm-6b/blob/main/config.json
PRESETS: dict[str, dict[str, Any]] = {
    "chatglm-6b": {},
    # The first release: 20000 image tokens in front of the text vocabulary.
    "chatglm-6b-150k": dict(
        vocab_size=150528, bos_token_id=150004, eos_token_id=150005, mask_token_id=150000,
        gmask_token_id=150001, pad_token_id=20003,
    ),
    # https://github.com/THUDM/GLM-130B/blob/main/configs/model_glm_130b.sh (--fp16 weights)
    "glm-130b": glm130b_architecture(
        num_layers=70, hidden_size=12288, inner_hidden_size=32768, num_attention_heads=96, vocab_size=150528,
        max_sequence_length=2048, torch_dtype="float16",
    ),
}


# Presets whose DeepNorm alpha follows the depth, so a shallower variant (tests, ablations) gets its own.
ALPHA_FOLLOWS_DEPTH = ("glm-130b",)


def preset(name: str, **overrides: Any) -> GLMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    if name in ALPHA_FOLLOWS_DEPTH and "residual_alpha" not in overrides:
        values["residual_alpha"] = math.sqrt(2 * values["num_layers"])
    return GLMConfig(**values)
