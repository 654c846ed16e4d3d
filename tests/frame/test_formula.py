"""Formula parsing: lme4 syntax into response, fixed part and random terms; clear errors otherwise."""

from __future__ import annotations

import pytest

from lmevi import FormulaError, parse_formula
from lmevi.frame.formula import RandomTerm


def terms(text: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(t.coefs, t.group) for t in parse_formula(text).random]


def test_random_intercept_and_default_fixed_part():
    f = parse_formula("y ~ (1 | g)")
    assert (f.response, f.fixed) == ("y", "1")  # no fixed part: intercept only, as lme4
    assert f.random == (RandomTerm(coefs="1", group=("g",)),)
    assert f.random[0].text == "(1 | g)"
    assert f.columns == ("g",)


def test_correlated_slope_keeps_its_coefficients_together():
    f = parse_formula("Reaction ~ Days + (1 + Days | Subject)")
    assert (f.response, f.fixed) == ("Reaction", "Days")
    assert terms(f.text) == [("1 + Days", ("Subject",))]


@pytest.mark.parametrize(
    "text, want",
    [
        ("y ~ (x || g)", [("1", ("g",)), ("0 + x", ("g",))]),
        ("y ~ (1 + x + z || g)", [("1", ("g",)), ("0 + x", ("g",)), ("0 + z", ("g",))]),
        ("y ~ (0 + x || g)", [("0 + x", ("g",))]),
        ("y ~ (x - 1 || g)", [("0 + x", ("g",))]),
    ],
)
def test_double_bar_splits_into_uncorrelated_terms(text, want):
    """lme4's ``expandDoubleVerts``: one term per column, the intercept unless it is removed."""
    assert terms(text) == want


def test_nesting_expands_as_lme4_names_it():
    f = parse_formula("strength ~ 1 + (1 | batch/cask)")
    assert terms(f.text) == [("1", ("batch",)), ("1", ("cask", "batch"))]
    assert [t.group_name for t in f.random] == ["batch", "cask:batch"]
    assert f.columns == ("batch", "cask")


def test_interaction_groups_by_pairs():
    (term,) = parse_formula("y ~ (1 | a:b)").random
    assert (term.group, term.group_name) == (("a", "b"), "a:b")


@pytest.mark.parametrize(
    "text, fixed",
    [
        ("y ~ 0 + x + (1 | g)", "0 + x"),
        ("y ~ x - 1 + (1 | g)", "x - 1"),
        ("y ~ (1 | g) - 1", "- 1"),
        ("y ~ (1 | g) + x", "x"),
        ("y ~ x * z + I(x - 1) + (1 | g)", "x * z + I(x - 1)"),
    ],
)
def test_fixed_part_keeps_intercept_removal_and_order(text, fixed):
    assert parse_formula(text).fixed == fixed


def test_random_terms_keep_their_written_order():
    f = parse_formula("y ~ x + (1 | b) + (1 + x | a) + (1 | c)")
    assert [t.group for t in f.random] == [("b",), ("a",), ("c",)]


def test_bare_bar_reads_the_whole_right_side_as_one_random_term():
    """R parses ``y ~ 1 + x | g`` as ``y ~ (1 + x | g)``: '|' binds more loosely than '+'."""
    f = parse_formula("y ~ 1 + x | g")
    assert f.fixed == "1"
    assert terms(f.text) == [("1 + x", ("g",))]


def test_transformed_response_is_kept_as_an_expression():
    assert parse_formula("log(y) ~ x + (1 | g)").response == "log(y)"


@pytest.mark.parametrize(
    "text, names",
    [
        ("y + x", "exactly one '~'"),
        ("y ~ x ~ z", "exactly one '~'"),
        ("", "non-empty"),
        ("~ x + (1 | g)", "no response"),
        ("y ~ ", "no terms"),
        ("y ~ (1 | g", "unbalanced '\\('"),
        ("y ~ 1 | g)", "unbalanced '\\)'"),
        ("y | g ~ x", "cannot contain '\\|'"),
        ("y ~ (1 | g) + (1 | g)", "\\(1 \\| g\\) appears more than once"),
        ("y ~ (1 | a/b) + (1 | a)", "\\(1 \\| a\\) appears more than once"),
        ("y ~ (x || g) + (1 | g)", "\\(1 \\| g\\) appears more than once"),
        ("y ~ (1 | )", "no grouping factor"),
        ("y ~ ( | g)", "nothing on the left"),
        ("y ~ (1 | g + h)", "'g \\+ h' is not a column name"),
        ("y ~ (1 | log(g))", "'log\\(g\\)' is not a column name"),
        ("y ~ (1 | g | h)", "exactly one '\\|'"),
        ("y ~ (1 || g || h)", "more than one '\\|\\|'"),
        ("y ~ x - (1 | g)", "cannot be subtracted"),
        ("y ~ x + + (1 | g)", "two operators in a row"),
        ("y ~ x +", "dangling operator"),
    ],
)
def test_malformed_formulas_raise_a_formula_error_naming_the_problem(text, names):
    with pytest.raises(FormulaError, match=names):
        parse_formula(text)


def test_formula_error_is_a_value_error():
    assert issubclass(FormulaError, ValueError)
    with pytest.raises(ValueError):
        parse_formula("y ~ (1 | g")


@pytest.mark.parametrize("text", ["y ~ (1 + x | g) + (x | g)", "y ~ (1 | g:h) + (1 | h:g)"])
def test_repeated_term_written_differently_is_refused(text):
    with pytest.raises(FormulaError, match="more than once"):
        parse_formula(text)
