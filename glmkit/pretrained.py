"""The public face of glmkit: the names ChatGLM and Hugging Face users already know.

`GLMForCausalLM` is the bare `GLM` module plus the methods users call on it (`from_pretrained`,
`generate`, `chat`, `stream_chat`, `process_response`, `infill`, `embed`, `save_pretrained`); each method
delegates to the module that owns the idea, so the model file stays a model file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from glmkit.checkpoints.hf import load_model, save_model
from glmkit.families import family_of
from glmkit.generation import chat as chat_lib
from glmkit.generation.beam import beam_generate
from glmkit.generation.embed import EMBED_BATCH_TOKENS, embed
from glmkit.generation.generate import generate, stream_tokens
from glmkit.generation.infill import fill_text
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM
from glmkit.parallel import tp as tp_lib
from glmkit.peft.adapters import load_adapter
from glmkit.quant.quantize import use_kernels
from glmkit.text.chat_format import ChatFormat
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-model"
GLM4_DEMO_DIR = Path(__file__).parent / "assets" / "glm4-demo"
# The models shipped inside the package, by name: `--model glm4-demo`, glmkit.load("glm4-demo").
SHIPPED_MODELS = {"demo-model": DEMO_MODEL_DIR, "glm4-demo": GLM4_DEMO_DIR}


class NoDefaultModelError(FileNotFoundError):
    pass


class UnknownModelError(FileNotFoundError):
    pass


def resolve_model_path(path: str | Path) -> Path:
    """`path` itself when it exists (a real directory always wins), else the shipped model of that name; a bare
    name that is neither is a one-line error listing the shipped names."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    name = str(path)
    if name in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[name]
        if not (shipped / "config.json").exists():
            raise UnknownModelError(f"this glmkit build does not ship {name} yet (rebuild it: glmkit demo build "
                                    f"--model {name})")
        return shipped
    if "/" not in name and "\\" not in name:
        raise UnknownModelError(f"{name} is neither a directory nor a shipped model (shipped: "
                                f"{', '.join(SHIPPED_MODELS)})")
    return candidate


def default_model_path() -> Path:
    """The demo model shipped inside the package, used when no model path is given."""
    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise NoDefaultModelError(
            "this glmkit build ships no demo model yet, so a model path is required: pass --model PATH "
            "(or glmkit.load(PATH)) with a ChatGLM-6B directory (config.json, weights, ice_text.model)"
        )
    return DEMO_MODEL_DIR


class GLMForCausalLM(GLM):
    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
        progress: bool = True, quantize: int | None = None, group_size: int | None = None,
        adapter: str | Path | None = None, tp: int = 1, tp_timeout: float = tp_lib.DEFAULT_TIMEOUT_S,
        quantize_embeddings: bool | int = False, kernels: str = "native",
    ) -> GLMForCausalLM:
        """Load a model directory in the official layout. dtype None: fp32 on CPU, the checkpoint's on GPU.

        quantize=8|4 quantizes the block linears while loading (INT4 group-wise, `group_size` columns
        per scale, 128 by default); a checkpoint saved quantized loads quantized without it.
        quantize_embeddings=True (or 8) also stores the word embedding and output table as INT8 rows,
        quantize_embeddings=4 as INT4 rows with one scale per 128 columns.
        adapter: a LoRA or P-Tuning v2 directory (`glmkit finetune`, PEFT, or the official ptuning
        scripts) applied on top, after quantizing.
        kernels: how quantized layers multiply on CPU: "native" (glmkit's kernels, int8 activations, fastest) or
        "exact" (float activations: the official quantized model's numbers).
        tp=N: this process is one of N torchrun ranks (every rank calls this alike); it joins the job
        (collectives time out after `tp_timeout` seconds) and holds only its shard of the model."""
        if tp > 1:
            if adapter is not None:
                raise tp_lib.TPError("adapters are not sharded: fold it in first (glmkit merge), then load with --tp")
            device = tp_lib.init(tp, device, tp_timeout)
        path = resolve_model_path(path)
        model = load_model(path, dtype=dtype, device=device, progress=progress and tp_lib.rank() == 0,
                           model_class=cls, quantize=quantize, group_size=group_size, tp=tp,
                           quantize_embeddings=quantize_embeddings)
        use_kernels(model, kernels)
        if adapter is not None:
            load_adapter(model, adapter)
        return model

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the official layout (safetensors unless safe_serialization=False), tokenizer included."""
        return save_model(self, path, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """HF-style: returns the prompts followed by the new tokens. Accepts (and re-derives) the
        tokenizer's attention_mask / position_ids, so `model.generate(**tokenizer(texts, padding=True))` works."""
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        params = SamplingParams(**_eos_as_tuple(kwargs))
        if params.num_beams > 1:
            return beam_generate(self, input_ids, params)
        return generate(self, input_ids, params)

    def stream_generate(self, input_ids: torch.Tensor, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Like generate, but yields each step's new tokens [B] as they are produced."""
        params = SamplingParams(**_eos_as_tuple(kwargs))
        if params.num_beams > 1:
            raise ValueError("beam search only knows its answer at the end, so it cannot stream tokens; "
                             "call generate(..., num_beams=N), or stream_chat, which yields the answer once")
        return stream_tokens(self, [row.tolist() for row in input_ids], params)

    def chat(self, tokenizer: Tokenizer, query: str, history: chat_lib.History | None = None, role: str = "user",
             reuse_cache: bool = True, **kwargs: Any) -> tuple[str | dict[str, Any], chat_lib.History]:
        """The official signature of the tokenizer's family: ChatGLM-6B chat(tokenizer, query, history=[],
        max_length=2048, top_p=0.7, temperature=0.95) with (query, response) tuples; ChatGLM2 the same with
        max_length=8192, top_p=0.8, temperature=0.8; ChatGLM3/GLM-4 also `role=` ("user", "observation", ...)
        and a history of role messages, the response as process_response returns it (a dict for a tool call).

        reuse_cache (causal families): keep this turn's KV cache on the model, and prefill only what the last
        turn's cache lacks (the same answer; `clear_kv_cache()` frees it, and must be called after changing the
        weights in place between turns)."""
        self.chat_format = chat_format_for(tokenizer)
        return chat_lib.chat(self, tokenizer, query, history, role, reuse_cache, **kwargs)

    def stream_chat(self, tokenizer: Tokenizer, query: str, history: chat_lib.History | None = None,
                    role: str = "user", reuse_cache: bool = True,
                    **kwargs: Any) -> Iterator[tuple[str | dict[str, Any], chat_lib.History]]:
        self.chat_format = chat_format_for(tokenizer)
        return chat_lib.stream_chat(self, tokenizer, query, history, role, reuse_cache, **kwargs)

    def process_response(self, output: str, history: list[dict[str, Any]] | None = None,
                         tokenizer: Tokenizer | None = None) -> Any:
        """The official modeling process_response of the model's chat format: ChatGLM3/GLM-4 (response, history)
        with one assistant message per segment and a tool call as {"name", "parameters"}; ChatGLM-6B/ChatGLM2 the
        cleaned-up text alone (their official process_response(response) takes no history).

        The format is the tokenizer's: `tokenizer`, else the one this model last chatted with or was loaded
        with by glmkit.load, else the tokenizer in the directory it was loaded from."""
        fmt = self._format_for_replies(tokenizer)
        if fmt.has_roles:
            return fmt.process_response(output, list(history or []))
        return fmt.parse(output)

    def _format_for_replies(self, tokenizer: Tokenizer | None) -> ChatFormat:
        if tokenizer is not None:
            return chat_format_for(tokenizer)
        fmt = self.__dict__.get("chat_format")
        if fmt is not None:
            return fmt
        path = self.__dict__.get("name_or_path")
        if path is None:
            raise ValueError("process_response needs the model's chat format: pass tokenizer=..., load the model "
                             "with glmkit.load or from_pretrained, or chat with it first")
        self.chat_format = chat_format_for(family_of(self.config).load_tokenizer(path))
        return self.chat_format

    def embed(self, tokenizer: Tokenizer, texts: str | Sequence[str],
              batch_tokens: int = EMBED_BATCH_TOKENS) -> torch.Tensor:
        """Unit-length fp32 embeddings of `texts`, [N, hidden] ([hidden] for one str), each encoded as a prompt
        (`tokenizer.encode`) and pooled per family: the last token's final hidden state for the causal families,
        the mean over the tokens for ChatGLM-6B and GLM-130B (glmkit.generation.embed, which also takes token
        ids). Run in batches of at most `batch_tokens` padded tokens; a text's vector does not depend on the batch."""
        single = isinstance(texts, str)
        vectors = embed(self, [tokenizer.encode(t) for t in ([texts] if single else texts)], batch_tokens)
        return vectors[0] if single else vectors

    def infill(self, tokenizer: Tokenizer, text: str, **kwargs: Any) -> str:
        """`text` with every [MASK] (a span), [sMASK] (a sentence) and [gMASK] (the rest) filled, left to right,
        each answer visible to the next blank. Greedy unless do_sample=True; num_beams searches each blank;
        max_new_tokens bounds each answer. glmkit.generation.infill.fill_text also returns the answers alone."""
        return fill_text(self, tokenizer, text, SamplingParams(**_eos_as_tuple(kwargs))).text


def _eos_as_tuple(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Accept HF's eos_token_id (int or list) as well as eos_token_ids."""
    eos = kwargs.pop("eos_token_id", None)
    if eos is not None:
        kwargs["eos_token_ids"] = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    return kwargs


def load(
    path: str | Path | None = None, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
    progress: bool = True, quantize: int | None = None, adapter: str | Path | None = None, tp: int = 1,
    tp_timeout: float = tp_lib.DEFAULT_TIMEOUT_S, quantize_embeddings: bool | int = False, kernels: str = "native",
) -> tuple[GLMForCausalLM, Tokenizer]:
    """(model, tokenizer) from a model directory or a shipped model's name (SHIPPED_MODELS); with no path, the
    shipped demo model."""
    path = resolve_model_path(path) if path is not None else default_model_path()
    model = GLMForCausalLM.from_pretrained(path, dtype=dtype, device=device, progress=progress, quantize=quantize,
                                           adapter=adapter, tp=tp, tp_timeout=tp_timeout,
                                           quantize_embeddings=quantize_embeddings, kernels=kernels)
    tokenizer = family_of(model.config).load_tokenizer(path)
    model.chat_format = chat_format_for(tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer in {path} has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
            "ice_text.model does not belong to these weights"
        )
    return model, tokenizer
