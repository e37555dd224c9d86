"""Adapters over a frozen base model: LoRA and P-Tuning v2, saved alone, loaded, and merged.

Files, so that other tools read them:
- LoRA follows PEFT's layout: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
  ...) and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in] and
  `lora_B.weight` [out, r]. The module names are the official ChatGLM-6B ones, so an adapter trained
  with PEFT on THUDM/chatglm-6b loads here and one trained here loads in PEFT.
- P-Tuning v2 keeps the official parameter names (`transformer.prefix_encoder.*`), in
  `adapter_model.safetensors` with an `adapter_config.json` of its own. A directory written by the
  official `ptuning/main.py` (config.json with pre_seq_len + pytorch_model.bin of the prefix) loads too.
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

from glmkit.models.config import GLMConfig
from glmkit.models.glm import GLM, PrefixEncoder
from glmkit.models.modules import replace_module
from glmkit.quant.quantize import QUANTIZED_LINEARS, QuantizedLinear, dequantize, pack_int4, quantize_weight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PTUNING = "PTUNING_V2"
LORA = "LORA"
# What an adapter must agree on with its base model.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size")


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


def add_lora(model: GLM, config: LoraConfig) -> list[str]:
    """Wrap every targeted linear in a LoRALinear; returns the wrapped module names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear | QuantizedLinear) and matches_target(name, config.target_modules):
            layer = LoRALinear(module, config.r, config.lora_alpha, config.lora_dropout).train(model.training)
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
    """The adapter's tensors under their file names (PEFT's for LoRA, the official ones for P-Tuning)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            state[PEFT_PREFIX + name] = tensor
        elif name.startswith("transformer.prefix_encoder."):
            state[name] = tensor
    return state


def save_adapter(model: GLM, directory: str | Path, lora: LoraConfig | None = None) -> Path:
    """Write the adapter alone: a few MB however large the base."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = adapter_kind(model)
    if kind is None:
        raise AdapterError("the model has no adapter to save")
    base = getattr(model, "name_or_path", "")
    if kind == LORA:
        config = (lora or lora_config_of(model)).to_peft(base)
    else:
        config = {"peft_type": PTUNING, "pre_seq_len": model.config.pre_seq_len,
                  "prefix_projection": model.config.prefix_projection, "base_model_name_or_path": base}
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state(model).items()}
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
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0),
                          target_modules=list(config["target_modules"]))
        add_lora(model, lora)
        state = {_from_peft(k): v for k, v in state.items()}
    elif kind == PTUNING:
        add_prefix(model, int(config["pre_seq_len"]), bool(config.get("prefix_projection", False)))
    else:
        raise AdapterError(f"{directory}: adapter type {kind!r} is not one glmkit reads ({LORA}, {PTUNING})")
    _assign(model, state, directory)
    return kind


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
    weights = directory / "pytorch_model.bin"
    if not weights.exists():
        raise AdapterError(f"{directory} has no pytorch_model.bin holding the P-Tuning prefix")
    state = torch.load(weights, map_location="cpu", weights_only=True)
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
