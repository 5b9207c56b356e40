"""Rendering Jinja chat templates, and reading a template's *layout* — the text it puts around each role's
messages — by rendering sentinel conversations through it.

The layout is what both response-only masking (which text opens an assistant turn) and the Ollama Modelfile (a Go
template that renders the same text) need. It is read from the template itself, so a template swiftlora never saw
works as long as it has one of the shapes below; :func:`probe_chat_template` checks its reading by re-rendering
several conversations and comparing with Jinja, and raises :class:`TemplateProbeError` when they differ.

Shapes (``system_mode``):
- ``"turn"``: a system message is its own turn, ``system_prefix + content + system_suffix``;
- ``"fold"``: the system text opens the first user message, ``user_prefix + system + fold_separator + content``;
- ``"ignored"``: the template drops system messages (or refuses them).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime

# BOS texts that templates write literally instead of through ``bos_token``; never part of a layout (llama.cpp
# and Ollama add BOS themselves).
KNOWN_BOS_TEXTS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


class TemplateProbeError(ValueError):
    """The chat template does not have a layout swiftlora can read (see the module docstring)."""


@functools.lru_cache(maxsize=64)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for HF's assistant masks; render it as is.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                         bos_token: str | None = "", eos_token: str | None = "", **kwargs) -> str:
    """Renders a Jinja chat template the way transformers' ``apply_chat_template(tokenize=False)`` does (same
    environment: trim_blocks, lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``)."""
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)


@dataclass(frozen=True)
class TemplateLayout:
    """The text a chat template puts around messages. All fields are plain text; BOS is never part of them."""

    bos: str                       # the BOS text the template writes first ("" when none)
    system_mode: str               # "turn", "fold" or "ignored"
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_prefix: str = ""        # "turn"
    system_suffix: str = ""        # "turn"
    fold_separator: str = ""       # "fold"
    default_system: str | None = None  # system text used without a system message (None: nothing is rendered)
    preamble: str = ""             # "ignored": constant text before the first message

    def render(self, messages: list[dict]) -> str:
        """What the template renders for ``messages`` with the generation prompt, without BOS. The system text
        is the first system message's content, else ``default_system``; unknown roles are skipped."""
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        out = [self.preamble]
        if self.system_mode == "turn" and system is None and self.default_system is not None:
            out += [self.system_prefix, self.default_system, self.system_suffix]
        fold = (system if system is not None else self.default_system) if self.system_mode == "fold" else None
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "user":
                out.append(self.user_prefix)
                if fold:
                    out += [fold, self.fold_separator]
                    fold = None
                out += [content, self.user_suffix]
            elif role == "assistant":
                out += [self.assistant_prefix, content, self.assistant_suffix]
            elif role == "system" and self.system_mode == "turn":
                out += [self.system_prefix, content, self.system_suffix]
        out.append(self.generation_prompt)
        return "".join(out)

    def markers(self) -> tuple[str, str]:
        """(instruction_part, response_part): the text that opens a user turn and an assistant turn. Where a role
        has no prefix of its own, the end of the previous turn stands in (mistral: " [/INST]")."""
        instruction = self.user_prefix or self.assistant_suffix
        response = self.assistant_prefix or self.user_suffix
        if not instruction.strip() or not response.strip():
            raise TemplateProbeError("the chat template puts no text between user and assistant messages, so "
                                     "responses cannot be told apart from instructions")
        return instruction, response


# Sentinel message contents: plain words no template writes on its own.
_S, _U1, _A1, _U2, _A2, _U3 = "Sys7Kq", "Usr1Kq", "Ast1Kq", "Usr2Kq", "Ast2Kq", "Usr3Kq"
_BOS = "Bos7Kq"


def _msgs(*pairs) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _after(text: str, needle: str) -> str:
    return text[text.index(needle) + len(needle):]


def probe_chat_template(template: str, *, bos_token: str | None = "", eos_token: str | None = "") -> TemplateLayout:
    """Reads the layout of a Jinja chat template (see the module docstring); raises TemplateProbeError when the
    template does not fit one of the shapes or the reading does not reproduce its renderings.

    The template is rendered with a sentinel ``bos_token``, so a leading BOS is recognised even when the BOS text
    is also a chat marker (SmolLM2's BOS is ``<|im_start|>``); a BOS written later (llama-2 style, once per turn)
    stays in the layout as ``bos_token``'s text.
    """
    try:
        return _probe(template, bos_token or "", eos_token)
    except TemplateProbeError as e:  # show the BOS sentinel as what it stands for
        raise TemplateProbeError(str(e).replace(_BOS, "{{ bos_token }}")) from e.__cause__


def _probe(template: str, bos_token: str, eos_token: str | None) -> TemplateLayout:
    import jinja2

    def render(msgs, gen=True):
        return render_chat_template(template, msgs, add_generation_prompt=gen, bos_token=_BOS, eos_token=eos_token)

    try:
        r2 = render(_msgs(("user", _U1), ("assistant", _A1), ("user", _U2)))
        r1_open = render(_msgs(("user", _U1)), gen=False)
        r2_open = render(_msgs(("user", _U1), ("assistant", _A1)), gen=False)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateProbeError(f"the chat template fails on a plain user/assistant conversation: {e}") from e
    i1 = r2.find(_U1)
    j1 = r2.find(_A1, i1 + 1)
    i2 = r2.find(_U2, j1 + 1)
    if min(i1, j1, i2) < 0 or _U1 not in r1_open or _A1 not in r2_open:
        raise TemplateProbeError("the chat template does not write the message contents verbatim and in order")
    head, between_ua, between_au, tail = r2[:i1], r2[i1 + len(_U1):j1], r2[j1 + len(_A1):i2], r2[i2 + len(_U2):]

    lead = next((b for b in (_BOS,) + KNOWN_BOS_TEXTS if head.startswith(b)), "")
    head = head[len(lead):]
    # The text between a user message and the next assistant message is user_suffix + assistant_prefix; what the
    # template writes after a final user message without the generation prompt tells where the user turn ends.
    user_suffix = _common_prefix(_after(r1_open, _U1), between_ua)
    if not tail.startswith(user_suffix):
        user_suffix = _common_prefix(user_suffix, tail)
    assistant_suffix = _common_prefix(_after(r2_open, _A1), between_au)
    fields = dict(user_prefix=between_au[len(assistant_suffix):], user_suffix=user_suffix,
                  assistant_prefix=between_ua[len(user_suffix):], assistant_suffix=assistant_suffix,
                  generation_prompt=tail[len(user_suffix):])
    fields.update(_system_fields(render, lead, head, fields["user_prefix"]))
    fields = {k: v.replace(_BOS, bos_token) if isinstance(v, str) else v for k, v in fields.items()}
    layout = TemplateLayout(bos=bos_token if lead == _BOS else lead, **fields)
    _verify(layout, render, lead, bos_token)
    return layout


def _system_fields(render, lead: str, head: str, user_prefix: str) -> dict:
    """system_mode and its fields, from a rendering with a system message and from ``head`` (the text before the
    first user message without a system message, BOS removed)."""
    import jinja2

    try:
        r3 = render(_msgs(("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)))
    except jinja2.exceptions.TemplateError:
        r3 = None  # the template refuses system messages
    if r3 is None or _S not in r3:
        if user_prefix and not head.endswith(user_prefix):
            raise TemplateProbeError(f"the chat template opens the first user turn with {head!r}, "
                                     f"later ones with {user_prefix!r}")
        return dict(system_mode="ignored", preamble=head[:len(head) - len(user_prefix)])
    i_s, i_u = r3.index(_S), r3.find(_U1)
    if i_u < i_s:
        raise TemplateProbeError("the chat template puts the system message after the first user message")
    before, between = r3[len(lead) if r3.startswith(lead) else 0:i_s], r3[i_s + len(_S):i_u]
    if user_prefix and before == user_prefix:
        rest = head[len(user_prefix):] if head.startswith(user_prefix) else None
        if rest is None or (rest and not rest.endswith(between)):
            raise TemplateProbeError(f"cannot read the default system text of a folding template from {head!r}")
        return dict(system_mode="fold", fold_separator=between, default_system=rest[:len(rest) - len(between)] or None)
    if not between.endswith(user_prefix) or not head.endswith(user_prefix):
        raise TemplateProbeError(f"the chat template's system turn {before!r}...{between!r} is not followed by the "
                                 f"user prefix {user_prefix!r}")
    suffix = between[:len(between) - len(user_prefix)]
    pre_user = head[:len(head) - len(user_prefix)]
    default = None
    if pre_user:
        fits = len(pre_user) >= len(before) + len(suffix)
        if not (fits and pre_user.startswith(before) and pre_user.endswith(suffix)):
            raise TemplateProbeError(f"cannot read the default system turn from {pre_user!r}")
        default = pre_user[len(before):len(pre_user) - len(suffix)]
    return dict(system_mode="turn", system_prefix=before, system_suffix=suffix, default_system=default)


def _verify(layout: TemplateLayout, render, lead: str, bos_token: str) -> None:
    """Compares the layout's renderings with the template's (leading BOS removed) on a few conversations."""
    import jinja2

    plain = [("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2), ("user", _U3)]
    checks = [plain[:1], plain[:3], plain, [("system", _S)] + plain[:1], [("system", _S)] + plain]
    for pairs in checks:
        msgs = _msgs(*pairs)
        try:
            expected = render(msgs)
        except jinja2.exceptions.TemplateError:
            if layout.system_mode == "ignored" and pairs[0][0] == "system":
                continue
            raise
        expected = (expected[len(lead):] if expected.startswith(lead) else expected).replace(_BOS, bos_token)
        got = layout.render(msgs)
        if got != expected:
            raise TemplateProbeError(f"the layout read from the chat template renders {got!r} where the template "
                                     f"renders {expected!r} (roles {[r for r, _ in pairs]})")
