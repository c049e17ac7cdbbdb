"""One validation layer for every option peftkit reads: recipe keys and overrides, ``wrap`` / ``optimizer``
options, component options and the fields of ``adapter_config.json``.

An option is a dataclass field. Its type hint says what it accepts, and :func:`option` attaches the range,
the choices and an example to it (``r: int = option(8, gt=0)``); :func:`check_fields` checks a mapping of
values against such a dataclass before anything is allocated or written. The rules, the same everywhere:

- a ``bool`` option takes only a real boolean (YAML / CLI ``true`` / ``false``, Python ``True`` / ``False``);
  the string ``"false"`` and the integers 0 / 1 are refused, so no string can turn an option on;
- a number option takes only a number: a string such as ``"16"`` or ``"inf"`` is refused (recipes are read
  with YAML 1.2 number syntax, so an unquoted ``1e-4`` is a number); an ``int`` option takes an integral
  number (``8`` or ``8.0``); every number must be finite (no ``.inf`` / ``.nan``, ``Infinity`` / ``NaN``)
  and lie in the field's range; a range on a list, tuple or dict option applies to each of its numbers;
- ``choices`` lists the accepted values;
- an unknown key is an error that names the closest valid key;
- every integer lies within ``MAX_INT`` (a field may bound it further): no value can ask for an absurd
  allocation or a loop that never ends, and no huge literal reaches code that would overflow on it.

Untrusted text is parsed here too, bounded before anything walks the result: :func:`yaml_load` (duplicate keys
refused with their lines, nesting depth and the size an alias-expanded value would have bounded),
:func:`json_loads` (the same bounds) and :func:`compile_pattern` (regexes from recipes and adapter configs,
matched by RE2, a linear-time engine, so no pattern can backtrack for minutes).

Each failure is one error naming the field, what it expects, what it got and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import ConfigError, PeftkitError

RULE_KEY = "peftkit.rule"
# The largest integer any field takes unless its rule says less (int32: every size, count and step fits).
MAX_INT = 2**31 - 1
# Untrusted nested values (recipes, JSON files): the deepest nesting and the most values, aliases expanded.
MAX_DEPTH = 64
MAX_NODES = 200_000
MAX_PATTERN_CHARS = 1000


@dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type: bounds (on every number in it), choices, and an example value."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    example: Any = None
    # What the field expects, in words, when the generic wording is not enough ("a positive integer rank").
    expect: str = ""


def option(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: Iterable | None = None, example: Any = None, expect: str = "") -> Any:
    """A dataclass field with a validation rule; use it as the field's default (``r: int = option(8, gt=0)``)."""
    rule = Rule(ge, gt, le, lt, tuple(choices) if choices is not None else None, example, expect)
    kwargs: dict[str, Any] = {"metadata": {RULE_KEY: rule}}
    if default_factory is not MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def rule_of(field: dataclasses.Field) -> Rule:
    return field.metadata.get(RULE_KEY) or Rule()


@functools.lru_cache(maxsize=None)
def schema(cls: type) -> dict[str, tuple[Any, Rule, Any]]:
    """Field name -> (type hint, rule, default) of a dataclass (cached)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
        out[f.name] = (hints[f.name], rule_of(f), default)
    return out


# ------------------------------------------------------------------------------------------ one value
class _Mismatch(Exception):
    """A value that does not fit one arm of a union (internal)."""


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, str):
        return f"the string {value[:60]!r}{'...' if len(value) > 60 else ''}"
    if isinstance(value, int) and abs(value) > 10**30:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (dict, list, tuple)) and size_of(value, limit=1000) >= 1000:
        return f"a {type(value).__name__} of more than 1000 values"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _range_text(rule: Rule) -> str:
    low = f"[{_fmt(rule.ge)}" if rule.ge is not None else f"({_fmt(rule.gt)}" if rule.gt is not None else None
    high = f"{_fmt(rule.le)}]" if rule.le is not None else f"{_fmt(rule.lt)})" if rule.lt is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {_fmt(rule.ge)}" if rule.ge is not None else f" > {_fmt(rule.gt)}"
    if high:
        return f" <= {_fmt(rule.le)}" if rule.le is not None else f" < {_fmt(rule.lt)}"
    return ""


def describe(hint: Any, rule: Rule = Rule()) -> str:
    """What a hint (and its rule) accepts, in words: 'a finite number > 0', 'true or false or null' ..."""
    if rule.choices is not None:
        return "one of " + ", ".join(_yaml(c) for c in rule.choices)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [describe(a, rule) for a in args if a is not type(None)]
        text = " or ".join(arms)
        return text + (" or null" if type(None) in args else "")
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer" + _range_text(rule)
    if hint is float:
        return "a finite number" + _range_text(rule)
    if hint is str:
        return "a string"
    if origin is list:
        return f"a list of {_plural(args[0] if args else Any, rule)}"
    if origin is tuple:
        return f"{len(args)} {_plural(args[0], rule)}" if args and args[-1] is not Ellipsis else "a list"
    if origin is dict or hint is dict:
        if args:
            return f"a mapping of {_plural(args[0], Rule())} to {_plural(args[1], rule)}"
        return "a mapping"
    return str(hint)


def _plural(hint: Any, rule: Rule) -> str:
    words = {str: "strings", int: "integers", float: "finite numbers", bool: "booleans"}
    if hint in words:
        return words[hint] + (_range_text(rule) if hint in (int, float) else "")
    return describe(hint, rule)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _in_range(value: float, rule: Rule) -> bool:
    return not ((rule.ge is not None and value < rule.ge) or (rule.gt is not None and value <= rule.gt)
                or (rule.le is not None and value > rule.le) or (rule.lt is not None and value >= rule.lt))


def _convert(value: Any, hint: Any, rule: Rule) -> Any:
    """``value`` as ``hint`` (int -> float, integral float -> int, list -> tuple); raises _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, rule)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise _Mismatch
        if not math.isfinite(value):
            raise _Mismatch
        if hint is int:
            if isinstance(value, float):
                if not value.is_integer() or abs(value) > MAX_INT:
                    raise _Mismatch
                value = int(value)
        else:
            value = float(value)
        if not _in_range(value, rule):
            raise _Mismatch
        return value
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list or hint is list:
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, item, rule) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], rule) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a, rule) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return value
        return {_convert(k, args[0], Rule()): _convert(v, args[1], rule) for k, v in value.items()}
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch


def _is_choice(value: Any, choices: tuple) -> bool:
    # True == 1 in Python; a choice must match in type too (True is not the choice 1).
    return any(value == c and type(value) is type(c) for c in choices)


def check_value(name: str, value: Any, hint: Any, rule: Rule = Rule(), *, default: Any = None,
                error: type[PeftkitError] = ConfigError) -> Any:
    """``value`` checked against ``hint`` and ``rule`` (and normalised: int -> float ...); else one ``error``
    that names ``name``, what it expects, what it got and what to do."""
    if rule.choices is not None and isinstance(value, bool) and hint is not bool and "no" in rule.choices:
        # YAML 1.1 reads a bare no / yes as a boolean (mixed_precision: no).
        value = "yes" if value else "no"
    try:
        converted = _convert(value, hint, rule)
        if rule.choices is not None and not _is_choice(converted, rule.choices):
            raise _Mismatch
    except _Mismatch:
        if _too_large(value) and "integer" in describe(hint, rule):
            raise error(f"{name}: expected {rule.expect or describe(hint, rule)}, and at most {MAX_INT} (every "
                        f"integer peftkit reads is), got {_show(value)}; set a smaller value") from None
        raise error(f"{name}: expected {rule.expect or describe(hint, rule)}, got "
                    f"{_show(value)}; {_todo(name, value, hint, rule, default)}") from None
    return converted


def _too_large(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > MAX_INT
    return isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) > MAX_INT


def _todo(name: str, value: Any, hint: Any, rule: Rule, default: Any) -> str:
    if rule.choices is not None and isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in rule.choices if isinstance(c, str)], n=1)
        if close:
            return f"did you mean {close[0]!r}?"
    example = rule.example if rule.example is not None else default
    key = name.rsplit(": ", 1)[-1]
    if isinstance(value, str) and _bare(hint) in (bool, int, float):
        quoted = " (unquoted)" if _bare(hint) is not bool else " (unquoted true or false)"
        return f"write the value{quoted}" + (f", e.g. {key}={_yaml(example)}" if example is not None else "")
    if _bare(hint) is str and isinstance(value, (int, float)):
        return f"quote it ({key}: '{_yaml(value)}')"
    if example is not None:
        return f"set it as e.g. {key}={_yaml(example)}"
    return "fix or remove it"


def _bare(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


# ------------------------------------------------------------------------------------------ many values
def unknown_key(key: str, valid: Iterable[str], kind: str = "key", context: str = "") -> str:
    """'unknown key 'lrr'. Did you mean 'lr'? Valid: ...' (one line)."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{key}'{context}.{hint} Valid: {', '.join(valid) or 'none'}."


def check_fields(cls: type, values: Mapping[str, Any], *, prefix: str = "", unknown: str = "error",
                 kind: str = "option", context: str = "", error: type[PeftkitError] = ConfigError) -> dict[str, Any]:
    """Check ``values`` against the fields of dataclass ``cls``; returns the normalised values.

    ``unknown``: "error" (one error naming the closest field) or "ignore" (kept as they are: the fields of a
    foreign format, e.g. PEFT's adapter_config.json, that peftkit does not read). ``prefix`` goes in front of
    every field name in messages (``"optimizer."``, ``"adapter_config.json: "``).
    """
    fields = schema(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            if unknown == "error":
                raise error(unknown_key(f"{prefix}{key}", [f"{prefix}{k}" for k in fields], kind, context))
            out[key] = value
            continue
        hint, rule, default = fields[key]
        out[key] = check_value(f"{prefix}{key}", value, hint, rule, default=default, error=error)
    return out


def check_instance(obj: Any, *, prefix: str = "", error: type[PeftkitError] = ConfigError) -> None:
    """Check (and normalise in place) every field of a dataclass instance."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for key, value in check_fields(type(obj), values, prefix=prefix, error=error).items():
        setattr(obj, key, value)


def check_output_dir(path: str | Path, name: str) -> None:
    """An output folder (new or existing) must not be, or lie below, a file; else one ConfigError naming ``name``."""
    output = Path(path).expanduser()
    blocker = next((p for p in (output, *output.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == output else f"lies below the file {blocker}"
        raise ConfigError(f"{name}: {output} {where}, not a folder; give a new or existing folder")


# ------------------------------------------------------------------------------------------ untrusted text
class InputTooLarge(ConfigError):
    """A parsed value nested too deeply or too large once its aliases are expanded (a bomb)."""


def size_of(value: Any, limit: int = MAX_NODES, depth_limit: int = MAX_DEPTH) -> int:
    """How many values ``value`` holds once every shared (aliased) sub-value is counted at each place it
    appears, stopping at ``limit``; the walk visits each distinct container once, so a bomb costs no more than
    its text. Raises InputTooLarge past ``depth_limit`` levels."""
    sizes: dict[int, int] = {}

    def walk(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list, tuple)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > depth_limit:
            raise InputTooLarge(f"nested more than {depth_limit} levels deep")
        sizes[key] = limit  # a cycle (a recursive YAML alias) counts as too large
        total = 1
        for child in (list(node.keys()) + list(node.values()) if isinstance(node, dict) else node):
            total += walk(child, depth + 1)
            if total >= limit:
                break
        sizes[key] = min(total, limit)
        return sizes[key]

    return walk(value, 0)


def check_size(value: Any, what: str) -> Any:
    """``value`` when it is within the nesting and size bounds; else one InputTooLarge naming ``what``."""
    try:
        size = size_of(value)
    except InputTooLarge as exc:
        raise InputTooLarge(f"{what}: {exc}; flatten the value") from None
    if size >= MAX_NODES:
        raise InputTooLarge(f"{what}: holds more than {MAX_NODES:,} values once its aliases (&anchor / *alias) are "
                            "expanded; write the values out, without aliases that multiply them")
    return value


def json_loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` within the nesting and integer-length bounds; a failure is one ConfigError (a
    ``ValueError``) naming ``what``. Callers that raise another error class catch ``ValueError``."""
    import json

    try:
        value = json.loads(text)
    except RecursionError:
        raise InputTooLarge(f"{what}: nested too deeply to read (over {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, and an integer literal too long to convert
        raise ConfigError(f"{what}: not valid JSON ({exc})") from None
    try:  # JSON has no aliases: its size is its text's; only the depth is bounded
        size_of(value, limit=2**62)
    except InputTooLarge as exc:
        raise InputTooLarge(f"{what}: {exc}") from None
    return value


def compile_pattern(pattern: Any, name: str, error: type[PeftkitError] = ConfigError):
    """A regex from a recipe or an adapter config, compiled by RE2 (linear time in the name matched: no
    pattern can backtrack). RE2 takes Python's syntax except backreferences and look-arounds, which are refused
    here, as is a pattern over ``MAX_PATTERN_CHARS`` characters. Returns the compiled pattern (``.match``,
    ``.fullmatch``, ``.search`` as in ``re``)."""
    if not isinstance(pattern, str):
        raise error(f"{name}: expected a regex string, got {_show(pattern)}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise error(f"{name}: the regex is {len(pattern):,} characters long, more than {MAX_PATTERN_CHARS}; "
                    "list module names instead")
    return _compiled(pattern, name, error)


@functools.lru_cache(maxsize=4096)
def _re2(pattern: str):
    try:
        import re2
    except ImportError:  # a dependency (pyproject.toml); without it no untrusted regex is matched at all
        raise PeftkitError("regexes from recipes and adapter configs are matched by RE2, and the package "
                           "google-re2 is not installed; pip install google-re2") from None

    options = re2.Options()
    options.log_errors = False  # RE2 would print its own line to stderr
    return re2.compile(pattern, options)


def _compiled(pattern: str, name: str, error: type[PeftkitError]):
    try:
        return _re2(pattern)
    except Exception as exc:  # re2.error (an invalid pattern); the PeftkitError above passes through
        if isinstance(exc, PeftkitError):
            raise
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise error(f"{name}: '{pattern}' is not a valid regex ({reason}); fix the pattern (backreferences and "
                    "look-arounds are not supported: RE2 syntax)") from None


def pattern_suffix_match(key: str, module_name: str, name: str = "rank_pattern",
                         error: type[PeftkitError] = ConfigError) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: ``(.*\\.)?(KEY)$`` matches ``module_name`` from its start."""
    compile_pattern(key, f"{name}: key", error)  # the key alone: its own error names it
    return _compiled(rf"(.*\.)?({key})$", f"{name}: key", error).match(module_name) is not None


# ------------------------------------------------------------------------------------------ YAML
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` (YAML 1.2 exponent syntax, no dot) as a number, not a string."""


    def compose_node(self, parent, index):
        # The composer recurses per level: bound the depth here, with the line, before Python's stack runs out.
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        # A repeated key would silently replace the first one (a second `training:` drops the first section).
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {seen[key]}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def yaml_load(text: str, what: str = "YAML") -> Any:
    """Parse YAML safely (no object construction), with YAML 1.2 exponent numbers; a repeated key is a
    ``yaml.YAMLError`` with its line, and the result is bounded (:func:`check_size`) before anything walks it:
    an alias bomb or a too deep or too long value is one :class:`InputTooLarge` (a ConfigError) naming ``what``."""
    try:
        value = yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader
    except RecursionError:
        raise InputTooLarge(f"{what}: nested too deeply to read (over {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer literal longer than Python converts (4300 digits)
        raise ConfigError(f"{what}: a value could not be read ({exc}); write a smaller number") from None
    return check_size(value, what)
