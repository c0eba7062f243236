"""How an option is declared, checked and resolved; no option is declared here."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import inspect
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import dask.config
import dask.utils

from ..errors import NetworkPolicyError, OptionError
from ..names import CLUSTER_TAG

Check = Callable[[Any, str], Any]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a field knows beyond its name and type."""

    default: Any
    doc: str
    types: tuple[str, ...]
    check: Check | None
    enum: tuple[Any, ...] | None
    note: str | None


def option(
    default: Any,
    doc: str,
    *,
    types: str | tuple[str, ...],
    check: Check | None = None,
    enum: tuple[Any, ...] | None = None,
    note: str | None = None,
) -> Any:
    """Declare one option. ``default`` is the value as written in the dask config
    (``"24h"``, a list); ``types`` are its JSON schema types (``"null"`` among them makes
    it optional); ``check`` turns a given value into the field's type or raises
    :class:`OptionError`; ``note`` is the short comment ``secure-cloud.yaml`` shows."""
    spec = _Spec(
        default,
        inspect.cleandoc(doc),
        (types,) if isinstance(types, str) else types,
        check,
        enum,
        note,
    )
    return dataclasses.field(metadata={"option": spec})


# -- checks: (value, what to call it in an error) -> the value as the field holds it --------


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, got {value!r}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise OptionError(f"{name} must be a non-empty string, got {value!r}")
    if "\0" in value:
        raise OptionError(f"{name} must not contain a NUL character, got {value!r}")
    return value


def _url(value: Any, name: str) -> str:
    """An ``http://`` or ``https://`` URL with a host: what every endpoint option is
    handed to (an SDK, ``urllib``), so a bare host or a typo fails here, not mid-start."""
    text = _text(value, name)
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (a malformed port raises here)
    except ValueError as e:
        raise OptionError(
            f"{name} must be a URL such as 'https://host:port', got {value!r} ({e})"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or text != text.strip():
        raise OptionError(f"{name} must be an http:// or https:// URL with a host, got {value!r}")
    return text


def _path(value: Any, name: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _text(value, name)


def _whole(minimum: int, unit: str = "") -> Check:
    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise OptionError(f"{name} must be a whole number{unit} >= {minimum}, got {value!r}")
        return value

    return check


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise OptionError(f"{name} must be a finite number, got {value!r}")
    return number


def duration(value: Any, name: str) -> datetime.timedelta:
    """A positive duration: a ``timedelta``, seconds, or Dask's text (``"12h"``)."""
    wanted = f"{name} must be a duration such as '12h', '30m' or a number of seconds"
    if isinstance(value, datetime.timedelta):
        delta = value
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        raise OptionError(f"{wanted}, got {value!r}")
    else:
        try:
            seconds = dask.utils.parse_timedelta(value, default="s")
            delta = datetime.timedelta(seconds=seconds)
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise OptionError(f"{wanted}, got {value!r}") from e
        except OverflowError as e:
            raise OptionError(f"{wanted} shorter than a million days, got {value!r}") from e
    if delta <= datetime.timedelta(0):
        raise OptionError(f"{name} must be positive, got {value!r}")
    return delta


def port(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise OptionError(f"{name} must be a TCP port from 1 to 65535, got {value!r}")
    return value


def _texts(what: str, *, empty_items: bool = False) -> Check:
    """A list of strings, held as a tuple; a bare string is refused, not split, and so is
    an empty item unless ``empty_items``."""

    def check(value: Any, name: str) -> tuple[str, ...]:
        if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
            raise OptionError(
                f"{name} must be a list of {what}, got {value!r}; wrap a single one in a list"
            )
        for item in value:
            if not isinstance(item, str) or not (item or empty_items) or "\0" in item:
                raise OptionError(
                    f"{name} must be a list of {what} (non-empty strings), got {value!r}: "
                    f"{item!r} is not one"
                )
        return tuple(value)

    return check


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise OptionError(
            f"{name} must be a mapping with non-empty string keys, got {value!r}; "
            "for example {'key': 'value'}"
        )
    return dict(value)


def _strings_to_strings(value: Any, name: str) -> dict[str, str]:
    found = _mapping(value, name)
    for key, item in found.items():
        if not isinstance(item, str):
            raise OptionError(
                f"{name} must map strings to strings, got {key!r}: {item!r}; "
                f"write it as a string, for example {{{key!r}: {str(item)!r}}}"
            )
    if CLUSTER_TAG in found:
        raise OptionError(f"{name}: {CLUSTER_TAG!r} is set by the cluster itself")
    return found


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _environment(value: Any, name: str) -> dict[str, str]:
    """Variable names a shell and Docker take, to string values. A number is refused
    rather than turned into text: whether ``1.0`` should read ``"1.0"`` or ``"1"`` is
    the caller's to say."""
    found = _mapping(value, name)
    for key, item in found.items():
        if not _ENV_NAME.fullmatch(key):
            raise OptionError(
                f"{name}: {key!r} is not a variable name; use ASCII letters, digits and "
                "'_', not starting with a digit"
            )
        if not isinstance(item, str):
            raise OptionError(
                f"{name}: {key} must be a string, got {item!r}; an environment holds "
                f"text only, for example {{{key!r}: {str(item)!r}}}"
            )
        if "\0" in item:
            raise OptionError(f"{name}: {key} must not contain a NUL character")
    return found


def _word(item: Any) -> bool:
    """Whether ``item`` can be one argument of a command: text, or a finite number."""
    if isinstance(item, str):
        return "\0" not in item
    if isinstance(item, bool):
        return False
    return isinstance(item, int) or (isinstance(item, float) and math.isfinite(item))


def _command_options(value: Any, name: str) -> dict[str, Any]:
    """Options of a ``dask`` command: each a flag (``True``/``False``), a string or
    number, or a list of them for an option given more than once. Which options the
    command has is checked against the command itself (``plan._cli_flags``)."""
    found = _mapping(value, name)
    for key, item in found.items():
        if isinstance(item, bool):
            continue
        items = list(item) if isinstance(item, list | tuple) else [item]
        if not items or not all(_word(i) for i in items):
            raise OptionError(
                f"{name}: {key!r} must be True/False (a flag), a string or number, or a "
                f"list of strings or numbers (an option given more than once), got {item!r}"
            )
    return found


def _matching(pattern: str, example: str, form: str = "") -> Check:
    """A string matching ``pattern``; the error shows ``form`` (if any) and ``example``."""
    compiled = re.compile(pattern)

    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            shape = f"be {form}, for example {example!r}" if form else f"look like {example!r}"
            raise OptionError(f"{name} must {shape}; got {value!r}")
        return value

    return check


def _tristate(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(
            f"{name} must be True, False or None (None: decided from the network's ways "
            f"out), got {value!r}"
        )
    return value


def _security(value: Any, name: str) -> Any:
    from distributed.security import Security

    if isinstance(value, bool | Security):
        return value
    raise OptionError(
        f"{name} must be True (generate credentials), False (plain tcp, trusted networks "
        f"only) or a distributed.Security; got {value!r}"
    )


def cidrs(value: Any, name: str) -> tuple[str, ...]:
    """Normalised CIDRs (an address alone is its /32 or /128), or the error naming the
    bad one."""
    cidrs = []
    for item in _texts("CIDRs")(value, name):
        try:
            cidrs.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as e:
            raise NetworkPolicyError(
                f"{name}: {item!r} is not an address or CIDR such as '203.0.113.7/32'"
            ) from e
    return tuple(cidrs)


#: CIDRs that admit every address.
WORLD = frozenset({"0.0.0.0/0", "::/0"})


def refuse_world(cidrs: Iterable[str], *, open_to_world: bool) -> None:
    """Refuse CIDRs that open the scheduler to the whole internet, unless the caller said
    so with ``open_to_world=True``."""
    if WORLD & set(cidrs) and not open_to_world:
        raise NetworkPolicyError(
            "allowed_cidrs opens the scheduler to the whole internet; if you really "
            "mean it, also pass open_to_world=True"
        )


def _network(value: Any, name: str) -> str:
    # ipaddress takes an int (1 is 0.0.0.1/32) too: only text is a network here.
    wanted = f"{name} must be a network such as '10.77.0.0/16', got {value!r}"
    if not isinstance(value, str):
        raise OptionError(wanted)
    try:
        return str(ipaddress.ip_network(value))
    except ValueError as e:
        raise OptionError(f"{wanted} ({e})") from e


def _choice(*values: str) -> Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in values:
            close = difflib.get_close_matches(str(value), values, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"{name} must be one of {', '.join(values)}; got {value!r}.{hint}")
        return value

    return check


DURATION = ("string", "number")


def specs(cls: type) -> Iterator[tuple[str, _Spec]]:
    """``(name, spec)`` of each option of an options class, in declaration order."""
    for field in dataclasses.fields(cls):
        yield field.name, field.metadata["option"]


def default(cls: type, name: str) -> Any:
    """The default of option ``name`` for ``cls``, as the dask config writes it."""
    for klass in cls.__mro__:
        changed = klass.__dict__.get("changed_defaults", {})
        if name in changed:
            return changed[name]
    return dict(specs(cls))[name].default


_T = TypeVar("_T")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _from_config(provider: str, name: str) -> tuple[Any, str | None]:
    """The dask config's value and key: the provider's section, then the shared one."""
    keys = [f"secure-cloud.{_key(name)}"]
    if provider:
        keys.insert(0, f"secure-cloud.{provider}.{_key(name)}")
    for key in keys:
        value = dask.config.get(key, default=None)
        if value is not None:
            return value, key
    return None, None
