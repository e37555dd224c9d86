"""Adapters over a frozen base model: LoRA and P-Tuning v2, saved alone, loaded, and merged.

Files, so that other tools read them:
- LoRA follows PEFT's layout: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
  ...) and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in] and
  `lora_B.weight` [out, r]. The module names are the official ones of the base model's family (ChatGLM-6B's;
  ChatGLM2/3 and GLM-4's THUDM `transformer.encoder.layers.N.self_attention.query_key_value`; transformers'
  `model.layers.N.self_attn.q_proj`...), so an adapter trained with PEFT on the official model loads here and
  one trained here loads in PEFT. Where the family stores q, k and v apart (transformers' glm, glm4) glmkit's
  LoRA on the fused query_key_value is written as one LoRA per part (the same A, B's rows of the part), and
  PEFT adapters on any of q_proj/k_proj/v_proj are fused back exactly (block-diagonal when their A differ).
- P-Tuning v2 keeps the official parameter names (`transformer.prefix_encoder.*`: ChatGLM-6B's, and
  ChatGLM2/3's PrefixEncoder sized for the KV heads, spec 5.1), in `adapter_model.safetensors` with an
  `adapter_config.json` of its own. A directory written by the official `ptuning/main.py` (config.json with
  pre_seq_len + pytorch_model.bin, or model.safetensors, of the prefix) loads too. GLM-4's code has no
  PrefixEncoder: its recipe is PEFT's PREFIX_TUNING (spec 5.2), whose `prompt_embeddings` [P, L*2*g*d] are
  the same numbers as the prefix encoder's embedding, so such adapters load, and a GLM-4 prefix without
  projection is saved in that layout.
The base model's shape travels in the safetensors metadata, so a mismatched base is refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from glmkit import families
from glmkit.families.base import Family, Fusion
from glmkit.models.config import GLMConfig
from glmkit.models.glm import GLM, PrefixEncoder
from glmkit.models.modules import replace_module
from glmkit.quant.quantize import QUANTIZED_LINEARS, QuantizedLinear, dequantize, pack_int4, quantize_weight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PTUNING = "PTUNING_V2"
PEFT_PREFIX_TUNING = "PREFIX_TUNING"
PEFT_PROMPT = "prompt_embeddings"
PREFIX_EMBEDDING = "transformer.prefix_encoder.embedding.weight"
LORA = "LORA"
# What an adapter must agree on with its base model.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size",
              "multi_query_group_num")


class AdapterError(ValueError):
    """An adapter that cannot be used with this base model, with the reason."""


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query_key_value"])  # PEFT's default for ChatGLM

    def to_peft(self, base: str) -> dict:
        return {"peft_type": LORA, "task_type": "CAUSAL_LM", **asdict(self), "bias": "none", "fan_in_fan_out": False,
                "inference_mode": True, "base_model_name_or_path": base, "modules_to_save": None,
                "init_lora_weights": True}


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * alpha / r, with the base frozen; B starts at zero (PEFT's init),
    so a fresh adapter leaves the model unchanged."""

    def __init__(self, base: nn.Linear | QuantizedLinear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {r}")
        self.base_layer = base
        dtype, device = _float_dtype(base), _device(base)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear | QuantizedLinear:
        """The base layer with the update folded in (a quantized base is re-quantized as it was)."""
        base = self.base_layer
        with torch.no_grad():
            if isinstance(base, QuantizedLinear):
                weight = dequantize(base.int_values(), base.weight_scale) + self.delta_weight()
                q, scale = quantize_weight(weight, base.bits, base.group_size)
                base.weight = pack_int4(q) if base.bits == 4 else q
                base.weight_scale = scale.to(base.weight_scale.dtype)
                base._kernel = None
            else:
                base.weight.data += self.delta_weight().to(base.weight.dtype)
        return base


def _float_dtype(layer: nn.Module) -> torch.dtype:
    return layer.weight_scale.dtype if isinstance(layer, QuantizedLinear) else layer.weight.dtype


def _device(layer: nn.Module) -> torch.device:
    return layer.weight.device


def matches_target(module_name: str, targets: list[str]) -> bool:
    """PEFT's rule: a target names a module exactly or is the last part(s) of its dotted name."""
    return any(module_name == t or module_name.endswith(f".{t}") for t in targets)


def add_lora(model: GLM, config: LoraConfig, ranks: dict[str, int] | None = None) -> list[str]:
    """Wrap every targeted linear in a LoRALinear; returns the wrapped module names. `ranks`: modules whose
    adapter has another rank than config.r (fused from parts), with the scaling of config.r kept."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear | QuantizedLinear) and matches_target(name, config.target_modules):
            r = (ranks or {}).get(name, config.r)
            layer = LoRALinear(module, r, config.lora_alpha * r / config.r, config.lora_dropout).train(model.training)
            replace_module(model, name, layer)
            wrapped.append(name)
    if not wrapped:
        known = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise AdapterError(f"no linear layer matches the LoRA targets {config.target_modules}; "
                           f"this model's linear layers are {known} (the four block linears are {QUANTIZED_LINEARS})")
    return wrapped


def add_prefix(model: GLM, pre_seq_len: int, prefix_projection: bool = False) -> PrefixEncoder:
    """Give the model a P-Tuning v2 prefix (fresh, small random init) and record it in its config."""
    if model.transformer.prefix_encoder is not None:
        raise AdapterError("the model already has a P-Tuning prefix; merge or drop it before adding another")
    model.config.pre_seq_len, model.config.prefix_projection = pre_seq_len, prefix_projection
    encoder = PrefixEncoder(model.config).to(device=model.device, dtype=model.dtype)
    encoder.train(model.training)  # a model loaded for inference must not get a prefix with dropout on
    nn.init.normal_(encoder.embedding.weight, std=0.02)
    model.transformer.prefix_encoder = encoder
    return encoder


def adapter_kind(model: GLM) -> str | None:
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        return LORA
    return PTUNING if model.transformer.prefix_encoder is not None else None


def shape_of(config: GLMConfig) -> dict:
    return {k: getattr(config, k) for k in SHAPE_KEYS}


def adapter_state(model: GLM) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file names (PEFT's over the family's official module names for LoRA, the
    official ones for P-Tuning)."""
    family = families.family_of(model.config)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            state.update((PEFT_PREFIX + n, t) for n, t in _lora_to_family(name, tensor, family, model.config))
        elif name.startswith("transformer.prefix_encoder."):
            state[name] = tensor
    return state


def _fusion_of(module: str, family: Family) -> tuple[str, Fusion] | None:
    """(block prefix, fusion) when the internal module is one the family stores in parts."""
    block, _, rest = module.partition(".layers.")
    number, _, path = rest.partition(".")
    fusion = next((f for f in family.fusions if path == f.internal), None)
    return (f"{block}.layers.{number}.", fusion) if fusion and number.isdigit() else None


def _lora_to_family(name: str, tensor: torch.Tensor, family: Family, config: GLMConfig):
    """An internal LoRA tensor as the family names it: renamed, or per part of a fused module (A shared, B split)."""
    module, ab, suffix = name.partition(".lora_A." if ".lora_A." in name else ".lora_B.")
    fused = _fusion_of(module, family)
    if fused is None:
        yield family.checkpoint_name(f"{module}.weight").removesuffix(".weight") + ab + suffix, tensor
        return
    block, fusion = fused
    pieces = tensor.split(list(fusion.rows(config)), dim=0) if "lora_B" in ab else [tensor] * len(fusion.parts)
    for part, piece in zip(fusion.parts, pieces, strict=True):  # copies: safetensors stores no shared memory
        yield family.checkpoint_name(f"{block}{part}.weight").removesuffix(".weight") + ab + suffix, piece.clone()


def _family_targets(targets: list[str], family: Family) -> list[str]:
    """Internal target module names (`query_key_value`) as the family's (transformers: q_proj, k_proj, v_proj)."""
    out = []
    for target in targets:
        fusion = next((f for f in family.fusions if f.internal.rpartition(".")[2] == target), None)
        if fusion is not None:
            out += [part.rpartition(".")[2] for part in fusion.parts]
            continue
        renamed = next((old for old, new in family.block_renames if new.rstrip(".").rpartition(".")[2] == target
                        and "." in new.rstrip(".")), None)
        out.append(renamed.rstrip(".").rpartition(".")[2] if renamed else target)
    return out


def _internal_targets(targets: list[str], family: Family) -> list[str]:
    """The family's target module names as glmkit's (the inverse of _family_targets)."""
    out = []
    for target in targets:
        fusion = next((f for f in family.fusions if target in [p.rpartition(".")[2] for p in f.parts]), None)
        if fusion is not None:
            out.append(fusion.internal.rpartition(".")[2])
            continue
        renamed = next((new for old, new in family.block_renames if old.rstrip(".").rpartition(".")[2] == target
                        and "." in old.rstrip(".")), None)
        out.append(renamed.rstrip(".").rpartition(".")[2] if renamed else target)
    return list(dict.fromkeys(out))


def _lora_from_family(state: dict[str, torch.Tensor], family: Family, config: GLMConfig, r: int,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A PEFT LoRA state (prefix stripped) under glmkit's names; parts of a fused module are fused: one LoRA of rank
    r when every part was written with the same A (glmkit's own), else block-diagonal (rank r per part present,
    zero rows for a part absent). Returns the state and the rank of each module whose rank is not r."""
    out, ranks, waiting = {}, {}, {}
    for name, tensor in state.items():
        module, ab, suffix = name.partition(".lora_A." if ".lora_A." in name else ".lora_B.")
        internal = family.internal_name(f"{module}.weight").removesuffix(".weight")
        slot = family.fusion_slot(f"{internal}.weight")
        if slot is None:
            out[internal + ab + suffix] = tensor
        else:
            target, index, _ = slot
            waiting.setdefault(target.removesuffix(".weight"), {})[(index, ab)] = tensor
    for module, parts in waiting.items():
        fusion = next(f for f in family.fusions if module.endswith(f.internal))
        rows = fusion.rows(config)
        present = sorted({i for i, _ in parts})
        a = [parts[(i, ".lora_A.")] for i in present]
        if len(present) == len(rows) and all(torch.equal(a[0], x) for x in a[1:]):
            out[f"{module}.lora_A.weight"] = a[0]
            out[f"{module}.lora_B.weight"] = torch.cat([parts[(i, ".lora_B.")] for i in present], dim=0)
            continue
        b = torch.zeros(sum(rows), r * len(present), dtype=a[0].dtype)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        for k, i in enumerate(present):
            b[starts[i]:starts[i] + rows[i], k * r:(k + 1) * r] = parts[(i, ".lora_B.")]
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = torch.cat(a, dim=0), b
        ranks[module] = r * len(present)
    return out, ranks


def save_adapter(model: GLM, directory: str | Path, lora: LoraConfig | None = None) -> Path:
    """Write the adapter alone: a few MB however large the base."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = adapter_kind(model)
    if kind is None:
        raise AdapterError("the model has no adapter to save")
    base = getattr(model, "name_or_path", "")
    if kind == LORA:
        lora = lora or lora_config_of(model)
        family_targets = _family_targets(lora.target_modules, families.family_of(model.config))
        config = LoraConfig(lora.r, lora.lora_alpha, lora.lora_dropout, family_targets).to_peft(base)
    elif _peft_prefix_family(model.config) and not model.config.prefix_projection:
        config = _peft_prefix_config(model.config, base)
    else:
        config = {"peft_type": PTUNING, "pre_seq_len": model.config.pre_seq_len,
                  "prefix_projection": model.config.prefix_projection, "base_model_name_or_path": base}
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state(model).items()}
    if config["peft_type"] == PEFT_PREFIX_TUNING:
        state = {PEFT_PROMPT: state[PREFIX_EMBEDDING]}
    save_file(state, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt", "glmkit_base_shape": json.dumps(shape_of(model.config))})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def lora_config_of(model: GLM) -> LoraConfig:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    first = layers[0][1]
    return LoraConfig(r=first.lora_A.out_features, lora_alpha=round(first.scaling * first.lora_A.out_features),
                      lora_dropout=first.lora_dropout.p,
                      target_modules=sorted({n.rpartition(".")[2] for n, _ in layers}))


def load_adapter(model: GLM, directory: str | Path) -> str:
    """Attach the adapter in `directory` to the model in place; returns its kind (LORA or PTUNING)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist; pass the folder that "
                                f"`glmkit finetune` wrote ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    if not (directory / ADAPTER_CONFIG).exists() and (directory / "config.json").exists():
        return _load_official_ptuning(model, directory)
    if not (directory / ADAPTER_CONFIG).exists() or not (directory / ADAPTER_WEIGHTS).exists():
        raise AdapterError(f"{directory} is not an adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = _read_adapter_config(directory / ADAPTER_CONFIG)
    state, base_shape = _read_weights(directory / ADAPTER_WEIGHTS)
    _check_base(model, base_shape, directory)
    kind = config.get("peft_type")
    if kind == LORA:
        family = families.family_of(model.config)
        targets = config["target_modules"]
        targets = [targets] if isinstance(targets, str) else list(targets)
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0),
                          target_modules=_internal_targets(targets, family))
        state, ranks = _lora_from_family({_from_peft(k): v for k, v in state.items()}, family, model.config,
                                         lora.r)
        add_lora(model, lora, ranks)
    elif kind == PTUNING:
        add_prefix(model, int(config["pre_seq_len"]), bool(config.get("prefix_projection", False)))
    elif kind == PEFT_PREFIX_TUNING:
        state = _from_peft_prefix(model, config, state, directory)
    else:
        raise AdapterError(f"{directory}: adapter type {kind!r} is not one glmkit reads ({LORA}, {PTUNING}, "
                           f"{PEFT_PREFIX_TUNING})")
    _assign(model, state, directory)
    return kind


def _peft_prefix_family(config: GLMConfig) -> bool:
    """GLM-4, whose official P-Tuning v2 is PEFT's PREFIX_TUNING (its code has no PrefixEncoder)."""
    from glmkit.families.chatglm2 import variant

    family = families.family_of(config)
    return family.name in ("glm", "glm4") or (family.name == "chatglm2" and variant(family.config_json(config))
                                              == "glm-4")


def _peft_prefix_config(config: GLMConfig, base: str) -> dict:
    """PEFT's PrefixTuningConfig as THUDM's GLM-4 finetune_demo writes it (num_attention_heads = the KV heads)."""
    return {"peft_type": PEFT_PREFIX_TUNING, "task_type": "CAUSAL_LM", "num_virtual_tokens": config.pre_seq_len,
            "num_layers": config.num_layers, "num_attention_heads": config.kv_heads,
            "token_dim": config.kv_heads * config.head_dim, "num_transformer_submodules": 1,
            "prefix_projection": False, "encoder_hidden_size": config.hidden_size, "inference_mode": True,
            "base_model_name_or_path": base}


def _from_peft_prefix(model: GLM, config: dict, state: dict[str, torch.Tensor],
                      directory: Path) -> dict[str, torch.Tensor]:
    """A PEFT PREFIX_TUNING adapter as the model's prefix: its prompt embeddings are the encoder's embedding."""
    if config.get("prefix_projection"):
        raise AdapterError(f"{directory}: PEFT prefix tuning with prefix_projection true is not supported; "
                           "train without the projection (THUDM's GLM-4 recipe) or use glmkit's P-Tuning v2")
    ours = {"num_layers": model.config.num_layers, "num_attention_heads": model.config.kv_heads,
            "token_dim": model.config.kv_heads * model.config.head_dim}
    wrong = [f"{k} {config[k]} (this model: {v})" for k, v in ours.items() if k in config and config[k] != v]
    if wrong or PEFT_PROMPT not in state:
        raise AdapterError(f"{directory}: the PEFT prefix does not fit this model's KV heads: "
                           f"{', '.join(wrong) or 'no ' + PEFT_PROMPT}; was it trained on this base model?")
    add_prefix(model, int(config["num_virtual_tokens"]), False)
    return {PREFIX_EMBEDDING: state[PEFT_PROMPT]}


# What each adapter type's config must hold: key -> (accepts, what it is).
_REQUIRED = {
    LORA: {"r": (lambda v: type(v) is int and v > 0, "a positive integer"),
           "lora_alpha": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
           "target_modules": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(m, str) for m in v),
                              "a list of module names")},
    PTUNING: {"pre_seq_len": (lambda v: type(v) is int and v > 0, "a positive integer")},
}


def _read_adapter_config(path: Path) -> dict:
    """adapter_config.json, checked: an object whose type's required keys hold what they must."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); restore it from where the adapter came from") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path} holds a {type(config).__name__}, not an object of adapter settings")
    for key, (accepts, what) in _REQUIRED.get(config.get("peft_type"), {}).items():
        if key not in config:
            raise AdapterError(f"{path} has no {key!r} ({what}), which a {config['peft_type']} adapter needs")
        if not accepts(config[key]):
            raise AdapterError(f"{path}: {key} must be {what}, not {json.dumps(config[key])[:40]}")
    return config


def _from_peft(name: str) -> str:
    """`base_model.model.X.lora_A.weight` (PEFT may also write `.lora_A.default.weight`) -> our name."""
    return name.removeprefix(PEFT_PREFIX).replace(".default.", ".")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for truncated files
        raise AdapterError(f"cannot read {path}: it is truncated or corrupt ({e})") from e
    shape = json.loads(meta["glmkit_base_shape"]) if "glmkit_base_shape" in meta else None
    return state, shape


def _check_base(model: GLM, base_shape: dict | None, directory: Path) -> None:
    if base_shape is None:
        return  # an adapter from another tool: the tensor shapes are still checked one by one
    ours = shape_of(model.config)
    wrong = [f"{k} {base_shape[k]} (this model: {ours[k]})" for k in SHAPE_KEYS if k in base_shape and base_shape[k] != ours[k]]
    if wrong:
        raise AdapterError(f"the adapter in {directory} was trained on a different base model: {', '.join(wrong)}; "
                           "load it with the model it was trained on")


def _assign(model: GLM, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = {k: v for k, v in model.state_dict().items() if ".lora_" in k or "prefix_encoder." in k}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected or missing:
        raise AdapterError(f"the adapter in {directory} does not fit this model: "
                           f"{'unexpected ' + ', '.join(unexpected[:3]) if unexpected else ''}"
                           f"{' missing ' + ', '.join(missing[:3]) if missing else ''}; "
                           "was it trained on this base model?")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise AdapterError(f"{name} has shape {tuple(tensor.shape)} in {directory}, but this model needs "
                               f"{tuple(expected[name].shape)}: the adapter belongs to another base model")
    model.load_state_dict(state, strict=False)


def _load_official_ptuning(model: GLM, directory: Path) -> str:
    """A checkpoint of the official ptuning/main.py: config.json with pre_seq_len, the prefix in pytorch_model.bin."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if not config.get("pre_seq_len"):
        raise AdapterError(f"{directory} has a config.json without pre_seq_len and no {ADAPTER_CONFIG}: "
                           "it is a model directory, not an adapter")
    weights = next((directory / n for n in ("pytorch_model.bin", "model.safetensors") if (directory / n).exists()),
                   None)
    if weights is None:
        raise AdapterError(f"{directory} has no pytorch_model.bin (or model.safetensors) holding the P-Tuning prefix")
    state = (_read_weights(weights)[0] if weights.suffix == ".safetensors"
             else torch.load(weights, map_location="cpu", weights_only=True))
    state = {k: v for k, v in state.items() if "prefix_encoder." in k}
    add_prefix(model, int(config["pre_seq_len"]), bool(config.get("prefix_projection", False)))
    _assign(model, state, directory)
    return PTUNING


def merge_adapter(model: GLM) -> GLM:
    """Fold LoRA updates into the base weights (the wrappers go away). A P-Tuning prefix cannot be
    folded into weights; it stays as the model's own prefix encoder (config pre_seq_len), which is how
    the official code stores a P-Tuning model too."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            replace_module(model, name, module.merged())
    return model


__all__ = ["AdapterError", "LoRALinear", "LoraConfig", "add_lora", "add_prefix", "load_adapter", "merge_adapter",
           "save_adapter"]
