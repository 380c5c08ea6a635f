"""Built-in tools the chat offers the model: the current date and time, a calculator, unit conversion.

Each is a plain function with type hints and a Google-style docstring (its JSON schema comes from them, as for user
tools). They take only what the model writes and touch nothing else: no files, no network, no `eval`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_EXPRESSION_CHARS = 200  # the calculator reads at most this much
MAX_EXPRESSION_NODES = 100  # numbers and operators in one expression
MAX_EXPONENT = 1000  # |b| in a ** b
MAX_INT_BITS = 4096  # an integer result or intermediate beyond this (about 1233 digits) is refused
MAX_NAME_CHARS = 64  # a unit or time zone name


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the model as the tool's result."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly as a calculator would.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(2 + 3) * 4 ** 2 / 7".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ToolError(f"not an arithmetic expression: {exc.msg if isinstance(exc, SyntaxError) else exc}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_EXPRESSION_NODES:
        raise ToolError(f"the expression has more than {MAX_EXPRESSION_NODES} parts")
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    return str(value) if isinstance(value, int) else f"{value:.15g}"


def _evaluate(node: ast.AST) -> int | float:
    """Walk the tree; only numbers and the arithmetic operators above are allowed (an allow-list, never `eval`)."""
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, complex, str, bytes, None, Ellipsis
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):  # (-8) ** (1 / 3)
            raise ToolError("the result is not a real number")
        return _checked(result)
    raise ToolError(f"{_describe(node)} is not allowed: only numbers, + - * / // % ** and parentheses")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponents are limited to ±{MAX_EXPONENT}")
    whole = isinstance(base, int) and isinstance(exponent, int) and exponent > 0
    if whole and max(abs(base).bit_length() - 1, 0) * exponent > MAX_INT_BITS:  # checked before computing it
        raise ToolError(f"the result would have more than {MAX_INT_BITS} bits")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"the result would have more than {MAX_INT_BITS} bits")
    return value


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Attribute):
        return f"the attribute {node.attr!r}"
    if isinstance(node, ast.Call):
        return "a function call"
    return f"{type(node).__name__}"


def current_time(timezone: str = "") -> str:
    """The current date, time and weekday in a time zone.

    Args:
        timezone: An IANA time zone such as "Asia/Shanghai" or "UTC"; empty for the server's own.
    """
    if len(timezone) > MAX_NAME_CHARS:
        raise ToolError(f"a time zone name is at most {MAX_NAME_CHARS} characters")
    if timezone.strip():
        try:
            now = datetime.now(ZoneInfo(timezone.strip()))
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"unknown time zone {timezone!r}; use an IANA name such as Asia/Shanghai") from None
        zone = timezone.strip()
    else:
        now = datetime.now().astimezone()
        zone = now.tzname() or "local"
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {zone})"


# Unit names joined by *, / or spaces, each with an optional one-digit power (m/s^2, kg*m**2): the text pint's parser
# may see is kept this simple, so that no expression in it (10**10**10) can take long.
_NAME = r"(?:[^\W\d]|°)(?:[^\W*/^]|°)*(?:(?:\^|\*\*)-?[1-9])?"
_UNIT_TEXT = re.compile(rf"\s*{_NAME}(?:\s*[*/ ]\s*{_NAME})*\s*\Z")


@lru_cache(maxsize=1)
def _units():
    """pint's registry, built once (it parses its definition file: about half a second)."""
    import pint

    return pint.UnitRegistry()


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity from one unit to another (length, mass, time, temperature, speed, energy, data ...).

    Args:
        value: The amount to convert.
        from_unit: The unit it is in, e.g. "km", "mile", "degC", "kg", "MiB", "kWh".
        to_unit: The unit wanted, of the same kind.
    """
    import pint

    for unit in (from_unit, to_unit):
        if len(unit) > MAX_NAME_CHARS or not _UNIT_TEXT.match(unit):
            raise ToolError(
                f"{unit[:MAX_NAME_CHARS]!r} is not a unit: names like km, degC or m/s^2, at most {MAX_NAME_CHARS} "
                "characters"
            )
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolError("the value must be a finite number")
    units = _units()
    try:
        # parse_units reads unit names with pint's own parser (no Python eval), and only units: "3 km" is refused
        source, target = units.parse_units(from_unit.strip()), units.parse_units(to_unit.strip())
        result = units.Quantity(value, source).to(target)
    except pint.DimensionalityError:
        raise ToolError(f"{from_unit} and {to_unit} measure different things") from None
    except pint.UndefinedUnitError as exc:
        raise ToolError(f"unknown unit: {exc}") from None
    except Exception:  # pint's parser raises assorted errors (AssertionError, TokenError ...) for odd text
        raise ToolError(f"cannot read {from_unit!r} or {to_unit!r} as a unit") from None
    return f"{value:g} {from_unit} = {result.magnitude:.10g} {to_unit}"


BUILTIN_TOOLS = (current_time, calculate, convert_units)
# Bounds the schemas carry too, so that a constrained call cannot write past them.
SCHEMA_LIMITS = {
    "calculate": {"expression": MAX_EXPRESSION_CHARS},
    "current_time": {"timezone": MAX_NAME_CHARS},
    "convert_units": {"from_unit": MAX_NAME_CHARS, "to_unit": MAX_NAME_CHARS},
}
