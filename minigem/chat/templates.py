"""Conversation templates: messages -> prompt text, cut into trainable / non-trainable segments.

Each named template reproduces the prompt format a released checkpoint was trained with
(LLaVA / Mini-Gemini `conversation.py` conventions). ``jinja`` instead renders the
tokenizer's own HF ``chat_template``.

Loss-masking rule, the same for every template: the trainable text of an assistant turn is
exactly what the model must write after the generation prompt, up to where the next turn
starts (its content plus the end-of-turn marker). Everything else (BOS, system prompt, user
turns, role headers) is context only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minigem.data.records import Message
from minigem.errors import ConfigError, DataError
from minigem.registry import Registry, RegistryError

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool  # True: these tokens count in the loss


def check_conversation(messages: list[Message], add_generation_prompt: bool = False) -> None:
    """Optional leading system message, then user/assistant alternating, starting with user."""
    if not messages:
        raise DataError("the conversation is empty")
    for k, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise DataError(
                f"message {k} has unknown role {m.role!r}; expected 'system', 'user' or 'assistant'"
            )
        if not isinstance(m.content, str):
            raise DataError(f"message {k} ({m.role}) content must be a string, got {type(m.content).__name__}")
    turns = messages[1:] if messages[0].role == "system" else messages
    if not turns:
        raise DataError("the conversation has a system message but no user message")
    for k, m in enumerate(turns, start=len(messages) - len(turns)):
        if m.role == "system":
            raise DataError(f"message {k} has role 'system'; only the first message may be a system message")
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m.role != expected:
            k = j + len(messages) - len(turns)
            raise DataError(
                f"message {k} has role {m.role!r} but {expected!r} was expected: a conversation "
                "must alternate user/assistant, starting with user (after an optional system message)"
            )
    if add_generation_prompt and turns[-1].role != "user":
        raise DataError("add_generation_prompt=True needs a conversation that ends with a user message")


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours with the same trainable flag."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].trainable == s.trainable:
            out[-1] = Segment(out[-1].text + s.text, s.trainable)
        else:
            out.append(s)
    return out


@dataclass(frozen=True)
class Template:
    """Base: validates roles and resolves the system prompt; subclasses lay out the turns."""

    name: str
    default_system: str | None = None
    stop_strings: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # markers the tokenizer must hold as single tokens

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        system: str | None = None,
        tokenizer: Any = None,
    ) -> list[Segment]:
        """Segments whose concatenated text is the full prompt.

        System prompt precedence: a leading system message > ``system`` > ``default_system``;
        ``system=""`` switches the default off.
        """
        check_conversation(messages, add_generation_prompt)
        if messages[0].role == "system":
            sys_text: str | None = messages[0].content
            turns = list(messages[1:])
        else:
            sys_text = system if system is not None else self.default_system
            turns = list(messages)
        return _merge(self._render(sys_text or None, turns, add_generation_prompt, tokenizer))

    def render_text(self, messages: list[Message], add_generation_prompt: bool = False,
                    system: str | None = None, tokenizer: Any = None) -> str:
        return "".join(s.text for s in self.render(messages, add_generation_prompt, system, tokenizer))

    def missing_tokens(self, tokenizer: Any) -> list[str]:
        """The template markers this tokenizer does not encode as one token."""
        return [t for t in self.special_tokens
                if len(tokenizer.encode(t, add_special_tokens=False)) != 1
                or tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]

    def to_jinja(self) -> str:
        """An HF ``chat_template`` rendering the same text (for exported checkpoints)."""
        raise ConfigError(f"template {self.name!r} has no Jinja form")

    def _render(self, system: str | None, turns: list[Message], add_generation_prompt: bool,
                tokenizer: Any) -> list[Segment]:
        raise NotImplementedError


def _lit(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def _wrap(fmt: str, field: str, value: str) -> str:
    """``"A{field}B"`` -> the Jinja expression ``'A' + value + 'B'``."""
    pre, post = fmt.split("{" + field + "}")
    return f"{_lit(pre)} + {value} + {_lit(post)}"


@dataclass(frozen=True)
class TurnTemplate(Template):
    """``bos + system_fmt + (user_fmt + header + assistant_fmt)*``; the assistant part trains.

    With ``system_fmt=None`` the system prompt is merged into the first user message with
    ``system_merge`` (templates without a system role).
    """

    bos: str = ""
    system_fmt: str | None = "{system}"
    system_merge: str = "{system}\n\n{content}"
    user_fmt: str = "{content}"
    header: str = ""  # the assistant header = the generation prompt
    assistant_fmt: str = "{content}"

    def _render(self, system, turns, add_generation_prompt, tokenizer):
        segs = [Segment(self.bos, False)]
        if system and self.system_fmt is not None:
            segs.append(Segment(self.system_fmt.format(system=system), False))
        for j, m in enumerate(turns):
            if m.role == "assistant":
                segs.append(Segment(self.assistant_fmt.format(content=m.content), True))
                continue
            content = m.content
            if j == 0 and system and self.system_fmt is None:
                content = self.system_merge.format(system=system, content=content)
            segs.append(Segment(self.user_fmt.format(content=content), False))
            if j + 1 < len(turns) or add_generation_prompt:
                segs.append(Segment(self.header, False))
        return segs

    def to_jinja(self) -> str:
        default = _lit(self.default_system or "")
        if self.system_fmt is None:
            pre, mid, post = re.split(r"\{system\}|\{content\}", self.system_merge)
            merge = (f"{{% if loop.first and system %}}{{% set content = {_lit(pre)} + system + "
                     f"{_lit(mid)} + content + {_lit(post)} %}}{{% endif %}}")
            sys_block = ""
        else:
            merge = ""
            sys_block = f"{{% if system %}}{{{{ {_wrap(self.system_fmt, 'system', 'system')} }}}}{{% endif %}}"
        return (
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set turns = messages[1:] %}{% else %}"
            f"{{% set system = {default} %}}{{% set turns = messages %}}{{% endif %}}"
            f"{{{{ {_lit(self.bos)} }}}}{sys_block}"
            "{% for m in turns %}{% if m['role'] == 'user' %}{% set content = m['content'] %}"
            f"{merge}{{{{ {_wrap(self.user_fmt, 'content', 'content')} }}}}"
            f"{{% if not loop.last %}}{{{{ {_lit(self.header)} }}}}{{% endif %}}"
            f"{{% else %}}{{{{ {_wrap(self.assistant_fmt, 'content', 'm[' + _lit('content') + ']')} }}}}"
            "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {_lit(self.header)} }}}}{{% endif %}}"
        )


@dataclass(frozen=True)
class PlainTemplate(Template):
    """LLaVA stage-1 alignment: user turns shrink to their ``<image>`` placeholders, then
    ``{caption}\\n`` trains. No system prompt. BOS is the tokenizer's, when one is passed
    (LLaVA's tokenizer adds it)."""

    def _render(self, system, turns, add_generation_prompt, tokenizer):
        bos = (tokenizer.bos_token or "") if tokenizer is not None else ""
        segs = [Segment(bos, False)]
        for m in turns:
            if m.role == "user":
                segs.append(Segment(IMAGE_TOKEN * m.content.count(IMAGE_TOKEN), False))
            else:
                segs.append(Segment(m.content + "\n", True))
        return segs

    def to_jinja(self) -> str:
        img = _lit(IMAGE_TOKEN)
        return (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            f"{{{{ {img} * m['content'].count({img}) }}}}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
        )


# ------------------------------------------------------------------ jinja (HF chat_template)


def _raise_exception(message: str) -> None:
    raise DataError(f"the chat_template rejected the conversation: {message}")


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # The same environment HF's apply_chat_template uses (sandboxed, trim/lstrip blocks).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"the tokenizer's chat_template is not valid Jinja: {err}") from None


def _chat_template_source(tokenizer: Any) -> str:
    if tokenizer is None:
        raise ConfigError("the 'jinja' template renders the tokenizer's chat_template; pass tokenizer=")
    source = getattr(tokenizer, "chat_template", None)  # external object: may lack the attribute
    if isinstance(source, dict):
        if "default" not in source:
            raise ConfigError(f"the tokenizer has several chat_templates {sorted(source)} and no 'default'")
        source = source["default"]
    if not source:
        raise ConfigError(
            "the tokenizer has no chat_template; set tokenizer.chat_template or choose a named "
            f"template ({', '.join(t for t in TEMPLATES if t != 'jinja')})"
        )
    return source


def _divergence(a: str, b: str) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{a[max(0, k - 20):k + 20]!r} vs {b[max(0, k - 20):k + 20]!r}"


@dataclass(frozen=True)
class JinjaTemplate(Template):
    """Renders ``tokenizer.chat_template``; trainable spans come from rendering prefixes.

    For assistant message i: ``head = render(messages[:i], add_generation_prompt=True)`` and
    ``turn = render(messages[:i+1])``; ``turn[len(head):]`` trains. This needs each rendering
    to be a prefix of the next, which holds for ChatML, Llama-3, Gemma, Mistral... but not
    for templates that rewrite earlier turns (those raise ConfigError).
    """

    def _render(self, system, turns, add_generation_prompt, tokenizer):
        compiled = _compile(_chat_template_source(tokenizer))
        msgs = ([Message("system", system)] if system else []) + turns
        tokens = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

        def render(ms: list[Message], gen: bool) -> str:
            data = [{"role": m.role, "content": m.content} for m in ms]
            try:
                return compiled.render(messages=data, add_generation_prompt=gen, **tokens)
            except jinja2.TemplateError as err:
                raise ConfigError(f"the tokenizer's chat_template failed to render: {err}") from None

        full = render(msgs, add_generation_prompt)
        segs: list[Segment] = []
        pos, prev = 0, ""
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            head, turn = render(msgs[:i], True), render(msgs[:i + 1], False)
            for a, b in ((prev, head), (head, turn), (turn, full)):
                if not b.startswith(a):
                    raise ConfigError(
                        "the tokenizer's chat_template cannot be used for loss masking: rendering "
                        f"a conversation prefix (up to message {i}) is not a prefix of the longer "
                        f"rendering ({_divergence(a, b)}); use a named template instead"
                    )
            segs += [Segment(full[pos:len(head)], False), Segment(turn[len(head):], True)]
            pos, prev = len(turn), turn
        segs.append(Segment(full[pos:], False))
        return segs


# ------------------------------------------------------------------ registry

TEMPLATES: Registry[Template] = Registry("chat template")

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)
_H = "<|start_header_id|>{}<|end_header_id|>\n\n"

for _t in (
    PlainTemplate("plain", stop_strings=("\n",)),
    TurnTemplate(
        "vicuna_v1", _VICUNA_SYSTEM, ("</s>",), ("<s>", "</s>"), bos="<s>",
        system_fmt="{system} ", user_fmt="USER: {content} ", header="ASSISTANT:",
        assistant_fmt=" {content}</s>",
    ),
    TurnTemplate(  # MGM-8B: the assistant header really is "system" (as released)
        "llama_3", _LLAMA3_SYSTEM, ("<|eot_id|>",),
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>", system_fmt=_H.format("system") + "{system}<|eot_id|>",
        user_fmt=_H.format("user") + "{content}<|eot_id|>", header=_H.format("system"),
        assistant_fmt="{content}<|eot_id|>",
    ),
    TurnTemplate(
        "chatml", None, ("<|im_end|>",), ("<|im_start|>", "<|im_end|>"),
        system_fmt="<|im_start|>system\n{system}<|im_end|>\n",
        user_fmt="<|im_start|>user\n{content}<|im_end|>\n", header="<|im_start|>assistant\n",
        assistant_fmt="{content}<|im_end|>\n",
    ),
    TurnTemplate(  # MGM-34B (LLaVA's MPT separator style: no newline between turns)
        "chatml_direct", "Answer the questions.", ("<|im_end|>",), ("<|im_start|>", "<|im_end|>"),
        system_fmt="<|im_start|>system\n{system}<|im_end|>",
        user_fmt="<|im_start|>user\n{content}<|im_end|>", header="<|im_start|>assistant\n",
        assistant_fmt="{content}<|im_end|>",
    ),
    TurnTemplate(  # MGM-2B: every model turn ends with <end_of_turn>\n<eos>
        "gemma", None, ("<end_of_turn>", "<eos>"), ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"),
        bos="<bos>", system_fmt=None, user_fmt="<start_of_turn>user\n{content}<end_of_turn>\n",
        header="<start_of_turn>model\n", assistant_fmt="{content}<end_of_turn>\n<eos>",
    ),
    TurnTemplate(  # MGM-8x7B: LLaVA's LLAMA_2 style with sep="<s>"
        "mistral_instruct", None, ("</s>",), ("<s>", "</s>"), system_fmt=None,
        system_merge="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        user_fmt="<s>[INST] {content} [/INST]", assistant_fmt=" {content} </s>",
    ),
    JinjaTemplate("jinja"),
):
    TEMPLATES.register(_t.name)(_t)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES.get(name)
    except RegistryError as err:
        raise ConfigError(str(err)) from None
