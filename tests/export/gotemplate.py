"""A small interpreter of Go's text/template, enough for Ollama chat templates, so tests can render a Modelfile's
TEMPLATE without Go or Ollama.

Supported: text and ``{{ }}`` actions with ``{{-``/``-}}`` trimming; ``if``/``else if``/``else``/``end``;
``range PIPE``, ``range $x := PIPE``, ``range $i, $x := PIPE`` (with ``else``); ``break``/``continue``; variable
declaration ``$x := ...`` and assignment ``$x = ...`` (Go's scoping: a variable lives until the ``end`` of the
block that declared it; assignment changes the nearest one); comments; fields ``.A.B``, ``$x.A``, ``$.A``, ``.``;
string (interpreted and raw), number and boolean constants; parenthesised calls of ``eq ne not and or len index
slice printf``. Anything else raises, so a template using more than this fails its test loudly.
"""
from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(`[^`]*`)|(\()|(\))|(:=|=)|(,)|([^\s()=,]+))')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _unquote(lit: str) -> str:
    out, i, body = [], 0, lit[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = body[i + 1]
        if kind in _ESCAPES:
            out.append(_ESCAPES[kind])
            i += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            out.append(chr(int(body[i + 2:i + 2 + width], 16)))
            i += 2 + width
    return "".join(out)


def _lex(src: str) -> list:
    """Text pieces (str) and actions ((content,) tuples) with trim markers applied."""
    items, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(text)
        items.append((m.group(2).strip(),))
        pos = m.end()
        if m.group(3):
            while pos < len(src) and src[pos] in " \t\r\n":
                pos += 1
    items.append(src[pos:])
    return [it for it in items if it != ""]


def _parse(items: list, i: int = 0, stop=("end",)):
    """A node list up to one of the ``stop`` keywords; returns (nodes, index of the stop action)."""
    nodes = []
    while i < len(items):
        it = items[i]
        if isinstance(it, str):
            nodes.append(("text", it))
            i += 1
            continue
        action = it[0]
        word = action.split(None, 1)[0] if action else ""
        if word in stop or (word == "else" and "else" in stop):
            return nodes, i
        if action.startswith("/*"):
            i += 1
        elif word in ("if", "range"):
            node, i = _parse_block(items, i, word, action[len(word):].strip())
            nodes.append(node)
        elif word in ("break", "continue"):
            nodes.append((word,))
            i += 1
        else:
            nodes.append(("expr", _tokens(action)))
            i += 1
    if "eof" not in stop:
        raise SyntaxError(f"missing {{{{ end }}}} (expected one of {stop})")
    return nodes, i


def _parse_block(items, i, word, head):
    body, i = _parse(items, i + 1, ("end", "else"))
    node = [word, _tokens(head), body, []]
    action = items[i][0]
    if action.startswith("else if") and word == "if":
        inner, i = _parse_block(items, i, "if", action[len("else if"):].strip())
        node[3] = [inner]
        return tuple(node), i
    if action == "else":
        node[3], i = _parse(items, i + 1, ("end",))
    return tuple(node), i + 1


def _tokens(src: str) -> list[str]:
    toks, pos = [], 0
    src = src.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise SyntaxError(f"cannot read {src[pos:]!r}")
        toks.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return toks


def _truth(v) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (list, dict)) and not v)


def _eq(a, *others):
    return any(a == b for b in others)


_FUNCS = {
    "eq": _eq, "ne": lambda a, b: a != b, "not": lambda a: not _truth(a), "len": len,
    "index": lambda x, *ks: [x := x[k] for k in ks][-1], "slice": lambda x, *a: x[slice(*a)],
    "printf": lambda fmt, *a: re.sub(r"%v", "%s", fmt) % a,
}

_FUNC_NAMES = set(_FUNCS) | {"and", "or"}


class Renderer:
    """``Renderer(template).render(data)``; ``data``: a dict (e.g. ``{"Messages": [{"Role": ..., "Content":
    ...}]}``)."""

    def __init__(self, template: str):
        self.nodes, _ = _parse(_lex(template), 0, ("eof",))

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.nodes, data, [{"$": data}], out)
        return "".join(out)

    def _run(self, nodes, dot, scopes, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "break":
                raise _Break
            elif kind == "continue":
                raise _Continue
            elif kind == "if":
                branch = node[2] if _truth(self._eval(node[1], dot, scopes)) else node[3]
                self._run(branch, dot, scopes + [{}], out)
            elif kind == "range":
                self._range(node, dot, scopes, out)
            else:
                value = self._statement(node[1], dot, scopes)
                if value is not None:
                    out.append(str(value).lower() if isinstance(value, bool) else str(value))

    def _range(self, node, dot, scopes, out):
        toks = node[1]
        names = []
        if ":=" in toks:
            k = toks.index(":=")
            names, toks = [t for t in toks[:k] if t != ","], toks[k + 1:]
        seq = self._eval(toks, dot, scopes)
        if not seq:
            self._run(node[3], dot, scopes + [{}], out)
            return
        for i, item in enumerate(seq):
            scope = dict(zip(names, [item] if len(names) == 1 else [i, item]))
            try:
                self._run(node[2], item, scopes + [scope], out)
            except _Continue:
                continue
            except _Break:
                break

    def _statement(self, toks, dot, scopes):
        if len(toks) >= 2 and toks[1] in (":=", "=") and toks[0].startswith("$"):
            value = self._eval(toks[2:], dot, scopes)
            if toks[1] == ":=":
                scopes[-1][toks[0]] = value
            else:
                target = next((s for s in reversed(scopes) if toks[0] in s), None)
                if target is None:
                    raise NameError(f"assignment to undeclared variable {toks[0]}")
                target[toks[0]] = value
            return None
        return self._eval(toks, dot, scopes)

    def _eval(self, toks, dot, scopes):
        args, pos = [], 0
        while pos < len(toks):
            value, pos = self._operand(toks, pos, dot, scopes)
            args.append(value)
        if toks and toks[0] in _FUNC_NAMES:
            return self._call(toks[0], args[1:])
        if len(args) != 1:
            raise SyntaxError(f"cannot evaluate {' '.join(toks)!r}")
        return args[0]

    def _call(self, name, args):
        if name == "and":
            return next((a for a in args if not _truth(a)), args[-1])
        if name == "or":
            return next((a for a in args if _truth(a)), args[-1])
        return _FUNCS[name](*args)

    def _operand(self, toks, pos, dot, scopes):
        tok = toks[pos]
        if tok == "(":
            depth, end = 0, pos
            for end in range(pos, len(toks)):
                depth += {"(": 1, ")": -1}.get(toks[end], 0)
                if depth == 0:
                    break
            return self._eval(toks[pos + 1:end], dot, scopes), end + 1
        if tok.startswith('"'):
            return _unquote(tok), pos + 1
        if tok.startswith("`"):
            return tok[1:-1], pos + 1
        if tok in ("true", "false"):
            return tok == "true", pos + 1
        if tok in _FUNC_NAMES:
            return tok, pos + 1
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), pos + 1
        if tok.startswith("$"):
            name, _, path = tok.partition(".")
            scope = next((s for s in reversed(scopes) if name in s), None)
            if scope is None:
                raise NameError(f"undefined variable {name}")
            return self._field(scope[name], path), pos + 1
        if tok.startswith("."):
            return self._field(dot, tok[1:]), pos + 1
        raise SyntaxError(f"unknown token {tok!r}")

    @staticmethod
    def _field(value, path: str):
        for part in filter(None, path.split(".")):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(f"no field {part!r} in {value!r:.60}")
            value = value[part]
        return value
