"""Jinja chat templates, rendered as transformers renders them, and glmkit's transcription of GLM-4's.

Why jinja2's sandbox and these options: the -hf and 0414 repos (and glm-4-9b-chat itself) ship their chat
format as a Jinja template in tokenizer_config.json, and a model is only served as it was trained if the
template is rendered exactly as transformers does: `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with the loop-controls extension, transformers' own `tojson` (json.dumps with
ensure_ascii=False, insertion order: transformers >= 4.42, pitfall 20) and `raise_exception`. The sandbox matters
because a template is data from a downloaded repo, not code glmkit trusts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmkit.text.batching import causal_batch, single_or_batch
from glmkit.text.tokenizer import BatchEncoding


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that refused the conversation (`raise_exception`)."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source text, in transformers' environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not compile: {error} (line {error.lineno})") from error


def render_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **context: Any,
) -> str:
    """The prompt text: `messages`, `tools` and `add_generation_prompt` (plus any special-token names in
    `context`) passed to the template, as `apply_chat_template(tokenize=False)` does."""
    try:
        return compile_template(source).render(
            messages=[dict(m) for m in messages], tools=None if tools is None else list(tools),
            add_generation_prompt=add_generation_prompt, **context,
        )
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template failed on these messages: {error}") from error


# glm-4-9b-chat's chat format, transcribed from the spec's rendering rules (section 4.4): the prefix, then per
# message a tools block (when the message carries "tools") and `<|role|>metadata\ncontent` (when the content is
# truthy), then `<|assistant|>` for the generation prompt. The tool descriptions are the model's own text. With
# trim_blocks, each "\n\n## " below renders as "\n## " (the newline right after a block tag is dropped), which
# is what the official template renders too.
_GLM4_PERSONA = "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
_GLM4_PYTHON = (
    "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，"
    "这些在线内容的访问将不会成功。"
)
_GLM4_BROWSER = (
    "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，"
    "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
)
_GLM4_COGVIEW = (
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
)
GLM4_FUNCTION_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

# What every GLM-4 template writes after a tool's entry: the end of the tools block, each turn as
# <|role|>metadata\ncontent, and the assistant's turn to come.
_GLM4_TURNS_AFTER_TOOLS = (
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for item in messages %}"
    "{% if item['tools'] is defined %}<|system|>\n" + _GLM4_PERSONA + "\n\n# 可用工具"
    "{% for tool in item['tools'] %}"
    "{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n" + GLM4_FUNCTION_SUFFIX +
    "{% elif tool['type'] == 'python' %}\n\n## python\n\n" + _GLM4_PYTHON +
    "{% elif tool['type'] == 'simple_browser' %}\n\n## simple_browser\n\n" + _GLM4_BROWSER +
    "{% elif tool['type'] == 'cogview' %}\n\n## cogview\n\n" + _GLM4_COGVIEW
    + _GLM4_TURNS_AFTER_TOOLS
)


# GLM-4's format with a one-line tools block, for small models trained by glmkit (the GLM-4 demo model ships it in
# its tokenizer_config.json): each tool as `## name(parameter, ...)`, no persona, no schema text. Roles, specials,
# `name\n{json}` calls and observations are glm-4-9b-chat's; only the system turn's text is shorter (GLM-4's own
# tools block is hundreds of tokens, which a small model trained on 2 cores cannot afford in every example).
GLM4_COMPACT_TOOLS_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for item in messages %}"
    "{% if item['tools'] is defined %}<|system|>\n# 可用工具"
    "{% for tool in item['tools'] %}"
    "{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}"
    "({{ ((tool['function']['parameters'] or {})['properties'] or {}) | list | join(', ') }})"
    + _GLM4_TURNS_AFTER_TOOLS
)


class ChatTemplateMixin:
    """`apply_chat_template` for a tokenizer that has `chat_template`, `encode` and `pad_token_id`.

    The rendered text starts with `[gMASK]<sop>` written by the template, so it is tokenised with
    add_special_tokens=False (the prefix appears once; pitfall 21)."""

    chat_template: str | None

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = False,
        return_tensors: str | None = None,
        chat_template: str | None = None,
        **context: Any,
    ) -> str | list[int] | BatchEncoding:
        """The repo's own template over `conversation`: text (tokenize=False), ids, or with return_dict a
        BatchEncoding with attention_mask and position_ids (a batch of one for return_tensors="pt")."""
        source = chat_template or self.chat_template
        if source is None:
            raise ChatTemplateError("this tokenizer has no chat_template (a base model): pass chat_template=...")
        text = render_template(source, conversation, tools, add_generation_prompt, **context)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        if not return_dict:
            return ids
        encoding = causal_batch([ids], self.pad_token_id, return_tensors=return_tensors)  # type: ignore[attr-defined]
        return single_or_batch(encoding, True, return_tensors)
