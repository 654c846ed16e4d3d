"""Formula stage: parse an lme4-style formula into a response, a fixed part and random-effect terms.

Supported (Bates et al. 2015, lme4 syntax)::

    y ~ fixed + (coefs | group) + (coefs || group) + ...

* ``fixed`` is any right-hand side that ``formulaic`` understands (intercept, numeric and categorical
  columns, interactions); an empty fixed part means ``1``.
* ``coefs`` is the per-level design of the term: ``1`` (a random intercept), ``1 + x`` or ``x`` (a
  correlated intercept and slope), ``0 + x`` (a slope without intercept). Columns of the per-level design
  are built by formulaic too.
* ``||`` makes the coefficients uncorrelated: as lme4 does, it splits the term into one term per column.
* ``group`` is a column, an interaction ``a:b`` (the pairs that occur) or a nesting ``a/b``, which expands
  to ``(coefs | a) + (coefs | b:a)`` with the group named ``b:a`` as lme4 names it.

Everything else raises :class:`FormulaError` naming the part that is not understood.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")
_OFFSET = re.compile(r"^offset\s*\((.*)\)$", re.S)


class FormulaError(ValueError):
    """A formula that lmevi cannot read; the message names the unsupported part."""


@dataclass(frozen=True)
class RandomTerm:
    """One random-effect term ``(coefs | group)``.

    Attributes:
        coefs: formulaic right-hand side of the per-level design (``"1"``, ``"1 + Days"``, ``"0 + x"``).
        group: the grouping columns; more than one means their interaction (``("cask", "batch")``).
        text: the term as lme4 would print it, e.g. ``"(1 | cask:batch)"``.
    """

    coefs: str
    group: tuple[str, ...]

    @property
    def group_name(self) -> str:
        """The grouping factor's name as lme4 prints it (``grpvar`` in ``ranef``, ``grp`` in ``VarCorr``)."""
        return ":".join(self.group)

    @property
    def text(self) -> str:
        return f"({self.coefs} | {self.group_name})"


@dataclass(frozen=True)
class Formula:
    """A parsed model formula.

    Attributes:
        response: the response: a column name or an R expression of columns (``log(y)``).
        fixed: formulaic right-hand side of the fixed effects (``"1"`` when none are given).
        random: the random-effect terms, in the order written (after ``/`` and ``||`` expansion).
        text: the formula as given.
        offsets: the expressions inside the ``offset(...)`` terms of the right-hand side, in the order written
            (R's ``offset(log(t))``: added to the linear predictor with coefficient 1).
    """

    response: str
    fixed: str
    random: tuple[RandomTerm, ...]
    text: str
    offsets: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Grouping columns named by the random terms (the fixed part's columns come from formulaic)."""
        seen: dict[str, None] = {}
        for term in self.random:
            for g in term.group:
                seen.setdefault(g, None)
        return tuple(seen)


def parse_formula(text: str) -> Formula:
    """Parse an lme4 formula.

    Args:
        text: e.g. ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"``.

    Returns:
        The parsed :class:`Formula`.

    Raises:
        FormulaError: for anything outside the supported syntax, naming the offending part.
    """
    if not isinstance(text, str) or not text.strip():
        raise FormulaError("the formula must be a non-empty string such as 'y ~ x + (1 | g)'")
    _check_parentheses(text)
    sides = _split_top(text, "~")
    if len(sides) != 2:
        raise FormulaError(f"a formula needs exactly one '~' between response and terms, got {text!r}")
    lhs, rhs = sides[0].strip(), sides[1].strip()
    if not lhs:
        raise FormulaError(f"the formula {text!r} has no response on the left of '~'")
    if "|" in lhs:
        raise FormulaError(f"the response {lhs!r} cannot contain '|'")
    if not rhs:
        raise FormulaError(f"the formula {text!r} has no terms on the right of '~'")

    fixed_parts: list[str] = []
    random: list[RandomTerm] = []
    offsets: list[str] = []
    if len(_split_top(rhs, "|")) > 1 or len(_split_top(rhs, "||")) > 1:
        # R reads ``y ~ 1 | g`` as ``y ~ (1 | g)``: '|' binds looser than '+', so the whole right side is
        # one random term and the fixed part is the intercept (lme4's nobars gives ``y ~ 1``)
        rhs = f"({rhs})"
    for sign, term in _signed_terms(rhs):
        offset = _OFFSET.match(term)
        if offset is not None and _closes_at_end(term, term.index("(")):
            if sign == "-":
                raise FormulaError(f"an offset cannot be subtracted: '- {term}' (write offset(-(...)))")
            offsets.append(offset.group(1).strip())
            continue
        inner = _random_inner(term)
        if inner is None:
            if "|" in term:
                raise FormulaError(f"'|' is only allowed inside a parenthesised random term, got {term!r}")
            fixed_parts.append(f"{sign} {term}" if fixed_parts or sign == "-" else term)
            continue
        if sign == "-":
            raise FormulaError(f"a random term cannot be subtracted: '- {term}'")
        random.extend(_parse_random(inner, term))

    if not random:
        raise FormulaError(
            f"the formula {text!r} has no random-effects term such as (1 | g): lmevi fits mixed models only "
            "(lme4 refuses too); for fixed effects alone use ordinary least squares"
        )
    seen: set = set()
    for r in random:
        key = (_coef_key(r.coefs), frozenset(r.group))
        if key in seen:
            raise FormulaError(f"the random term {r.text} appears more than once (perhaps written another way)")
        seen.add(key)

    fixed = " ".join(fixed_parts).strip() or "1"
    if fixed.startswith("+"):
        fixed = fixed[1:].strip()
    return Formula(response=lhs, fixed=fixed, random=tuple(random), text=text, offsets=tuple(offsets))


def _parse_random(inner: str, term: str) -> list[RandomTerm]:
    double = _split_top(inner, "||")
    if len(double) == 2:
        coefs, group, uncorrelated = double[0], double[1], True
    elif len(double) > 2:
        raise FormulaError(f"more than one '||' in the random term {term!r}")
    else:
        single = _split_top(inner, "|")
        if len(single) != 2:
            raise FormulaError(f"a random term needs exactly one '|' between coefficients and group: {term!r}")
        coefs, group, uncorrelated = single[0], single[1], False
    coefs, group = coefs.strip(), group.strip()
    if not coefs:
        raise FormulaError(f"the random term {term!r} has nothing on the left of '|'")
    groups = _parse_group(group, term)
    coef_list = _split_coefs(coefs, term) if uncorrelated else [coefs]
    return [RandomTerm(coefs=c, group=g) for g in groups for c in coef_list]


def _parse_group(group: str, term: str) -> list[tuple[str, ...]]:
    """``a`` -> [(a,)]; ``a:b`` -> [(a, b)]; ``a/b`` -> [(a,), (b, a)] (lme4 names the inner one ``b:a``)."""
    if not group:
        raise FormulaError(f"the random term {term!r} has no grouping factor on the right of '|'")
    nests = [p.strip() for p in group.split("/")]
    out: list[tuple[str, ...]] = []
    outer: tuple[str, ...] = ()
    for part in nests:
        raw = [n.strip() for n in part.split(":")]
        names = tuple(_unquote(n) for n in raw)
        for n, r in zip(names, raw):
            if not (_NAME.match(n) or r != n):
                raise FormulaError(
                    f"the grouping factor {group!r} in {term!r} is not supported: use column names joined "
                    f"by ':' (interaction) or '/' (nesting); {n!r} is not a column name"
                )
        outer = names + outer
        out.append(outer)
    return out


def _unquote(name: str) -> str:
    """```my g``` -> ``my g``: R's backticks around a column name that is not a plain identifier."""
    if len(name) > 2 and name.startswith("`") and name.endswith("`") and "`" not in name[1:-1]:
        return name[1:-1]
    return name


def _split_coefs(coefs: str, term: str) -> list[str]:
    """Split the left side of ``||`` into one per-column design, as lme4's ``expandDoubleVerts`` does."""
    parts = [t.strip() for s, t in _signed_terms(coefs) if s == "+"]
    dropped = {t.strip() for s, t in _signed_terms(coefs) if s == "-"}
    has_intercept = "0" not in parts and "1" not in dropped and "0" not in dropped
    out = ["1"] if has_intercept else []
    for p in parts:
        if p in ("0", "1"):
            continue
        out.append(f"0 + {p}")
    if not out:
        raise FormulaError(f"the random term {term!r} has no coefficients")
    return out


def _coef_key(coefs: str) -> tuple[bool, frozenset[str]]:
    """What a per-level design means, however written: ``1 + x``, ``x`` and ``x + 1`` are the same."""
    terms = _signed_terms(coefs)
    added = {re.sub(r"\s+", "", t) for s, t in terms if s == "+"}
    removed = {re.sub(r"\s+", "", t) for s, t in terms if s == "-"}
    intercept = "0" not in added and "1" not in removed and "0" not in removed
    return intercept, frozenset(added - {"0", "1"})


def _check_parentheses(text: str) -> None:
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise FormulaError(f"unbalanced ')' in formula {text!r}")
    if depth:
        raise FormulaError(f"unbalanced '(' in formula {text!r}")


def _split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` outside parentheses (``|`` never matches a half of ``||``)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            if sep == "|" and (text.startswith("||", i) or (i > 0 and text[i - 1] == "|")):
                i += 1
                continue
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _signed_terms(rhs: str) -> list[tuple[str, str]]:
    """Split a right-hand side at top-level ``+``/``-`` into ``(sign, term)`` pairs."""
    out, depth, start, sign = [], 0, 0, "+"
    for i, ch in enumerate(rhs):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch in "+-":
            piece = rhs[start:i].strip()
            if piece:
                out.append((sign, piece))
            elif i > 0 and rhs[:i].strip():
                raise FormulaError(f"two operators in a row near {rhs[max(0, i - 10):i + 10]!r}")
            sign, start = ch, i + 1
    piece = rhs[start:].strip()
    if not piece:
        raise FormulaError(f"the formula ends with a dangling operator: {rhs!r}")
    out.append((sign, piece))
    return out


def _closes_at_end(text: str, start: int) -> bool:
    """Whether the ``(`` at ``start`` is closed by the last character of ``text`` (``offset(a)`` but not
    ``offset(a) * (b)``)."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            return i == len(text) - 1
    return False


def _random_inner(term: str) -> str | None:
    """The inside of ``( ... | ... )`` if ``term`` is exactly one such parenthesised random term."""
    if not (term.startswith("(") and term.endswith(")")):
        return None
    depth = 0
    for i, ch in enumerate(term):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(term) - 1:
            return None  # e.g. "(a) : (b)" is not one parenthesised term
    inner = term[1:-1]
    return inner if "|" in _strip_nested(inner) else None


def _strip_nested(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        depth += ch == "("
        if depth == 0:
            out.append(ch)
        depth -= ch == ")"
    return "".join(out)
