"""Dataclasses <-> msgpack under a declared schema: data crosses a socket, never code.

A Schema names every dataclass that may cross and reads each one's fields from its type
annotations. Encoding packs a dataclass as an array `[type id, field, field, ...]` in declared
field order (no field names on the wire: both ends run the same code, which the handshake checks
through the schema's fingerprint). Decoding unpacks plain msgpack data (msgpack builds only
None, bools, numbers, text, bytes, arrays and maps) and then converts it to the type the reader
expects, checking every value against the annotations: a frame that does not fit raises
WireError, naming where it went wrong.

Supported annotations: None, bool, int, float, str, bytes, list[X], tuple[X, ...], tuple[X, Y],
dict[K, V], dict (plain data), X | Y, and the schema's dataclasses. A union may hold at most one
array-shaped member (a list, a tuple or dataclasses), so decoding never guesses.

Pure Python and msgpack: every layer can import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import operator
import types
import typing
from typing import Any, Callable

import msgpack

Converter = Callable[[Any], Any]  # raw msgpack data -> the value (raises _Mismatch)


class WireError(ValueError):
    """A frame that is not a message of the schema (or a value the schema cannot send)."""


class Schema:
    """The dataclasses that may cross, each with a stable id (its position in `types`)."""

    def __init__(self, name: str, dataclass_types: list[type]):
        self.name = name
        self.types = list(dataclass_types)
        self._ids: dict[type, int] = {}
        self._getters: dict[type, Callable[[object], tuple]] = {}
        self._fields: dict[type, list[tuple[str, Any]]] = {}
        for type_id, cls in enumerate(self.types):
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls!r} is not a dataclass")
            hints = typing.get_type_hints(cls)
            fields = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]
            self._ids[cls] = type_id
            self._fields[cls] = fields
            names = [name for name, _ in fields]
            getter = operator.attrgetter(*names) if names else (lambda obj: ())
            self._getters[cls] = getter if len(names) != 1 else (lambda obj, g=getter: (g(obj),))
        self._converters: dict[Any, Converter] = {}
        for cls in self.types:  # compile every field now: an unsupported annotation fails at import
            self.converter(cls)
        description = repr([(cls.__qualname__, [(n, _describe(t)) for n, t in self._fields[cls]])
                            for cls in self.types])
        self.fingerprint = hashlib.sha256(f"{name}:{description}".encode()).digest()[:16]

    # ---- encoding -------------------------------------------------------------------------
    def pack(self, value: object) -> bytes:
        try:
            return msgpack.packb(value, default=self._default, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise WireError(f"cannot encode a {type(value).__name__} for {self.name}: {exc}") from None

    def _default(self, obj: object) -> list:
        getter = self._getters.get(type(obj))
        if getter is None:
            raise TypeError(f"{type(obj).__qualname__} is not in the {self.name} schema")
        return [self._ids[type(obj)], *getter(obj)]

    # ---- decoding -------------------------------------------------------------------------
    def unpack(self, data: bytes | bytearray | memoryview, expected: Any) -> Any:
        """Decode one message and check it is an `expected` (a type expression of this schema)."""
        return self.convert(self.loads(data), expected)

    @staticmethod
    def loads(data: bytes | bytearray | memoryview) -> Any:
        """The plain msgpack data of a frame, before any check against the schema."""
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
        except Exception as exc:  # msgpack raises several kinds for malformed input
            raise WireError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None

    def convert(self, raw: Any, expected: Any, where: str = "message") -> Any:
        try:
            return self.converter(expected)(raw)
        except _Mismatch as exc:
            raise WireError(f"{where}{''.join(reversed(exc.path))}: {exc.problem}") from None

    def converter(self, tp: Any) -> Converter:
        found = self._converters.get(tp)
        if found is None:
            found = self._compile(tp)
            self._converters[tp] = found
        return found

    def _compile(self, tp: Any) -> Converter:
        if tp is type(None) or tp is None:
            return _exact(type(None), "null")
        if tp is bool:
            return _exact(bool, "a boolean")
        if tp is int:
            return _INT
        if tp is str:
            return _exact(str, "text")
        if tp is bytes:
            return _exact(bytes, "bytes")
        if tp is float:
            return _number
        if tp is dict or tp is Any or tp is object:
            return _plain
        if tp in self._ids:
            return self._dataclass(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (types.UnionType, typing.Union):
            return self._union(tp, args)
        if origin is list and len(args) == 1:
            return _list_of(self.converter(args[0]), list)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return _list_of(self.converter(args[0]), tuple)
        if origin is tuple and args:
            return _fixed_tuple([self.converter(a) for a in args])
        if origin is dict and len(args) == 2:
            return _dict_of(self.converter(args[0]), self.converter(args[1]))
        raise TypeError(f"the {self.name} schema cannot carry {tp!r}")

    def _dataclass(self, cls: type) -> Converter:
        type_id = self._ids[cls]
        names = [f".{name}" for name, _ in self._fields[cls]]
        width = len(names) + 1
        label = f"a {cls.__qualname__}"
        converters: list[Converter] = []

        def convert(raw: Any) -> Any:
            if type(raw) is not list or len(raw) != width or type(raw[0]) is not int or raw[0] != type_id:
                raise _expected(label, raw)
            try:
                values = [conv(value) for conv, value in zip(converters, raw[1:])]
            except _Mismatch as exc:  # the slow path, only to say which field
                for index, (conv, value) in enumerate(zip(converters, raw[1:])):
                    try:
                        conv(value)
                    except _Mismatch:
                        exc.path.append(names[index])
                        break
                raise
            try:
                return cls(*values)
            except (TypeError, ValueError) as exc:  # the class's own checks (__post_init__)
                raise _Mismatch(f"not a valid {cls.__qualname__}: {exc}") from None

        self._converters[cls] = convert  # before the fields: a dataclass may nest itself
        converters.extend(self.converter(t) for _, t in self._fields[cls])
        return convert

    def _union(self, tp: Any, args: tuple) -> Converter:
        scalars: dict[type, Converter] = {}
        array_like: list[Any] = []
        mapping: Converter | None = None
        for arg in args:
            origin = typing.get_origin(arg)
            if arg in self._ids or origin in (list, tuple):
                array_like.append(arg)
            elif arg is dict or origin is dict:
                mapping = self.converter(arg)
            elif arg is float:
                scalars[float] = scalars[int] = _number
            elif arg in (type(None), bool, int, str, bytes):
                scalars.setdefault(arg, self.converter(arg))
            else:
                raise TypeError(f"the {self.name} schema cannot carry {arg!r} in {tp!r}")
        dataclass_members = {self._ids[a]: self.converter(a) for a in array_like if a in self._ids}
        if len(array_like) > len(dataclass_members) and (dataclass_members or len(array_like) > 1):
            raise TypeError(f"{tp!r}: a union may hold one array-shaped member (a list, a tuple or dataclasses)")
        sequence = self.converter(array_like[0]) if array_like and not dataclass_members else None
        label = " | ".join(_describe(a) for a in args)

        def convert(raw: Any) -> Any:
            kind = type(raw)
            if kind is list:
                if sequence is not None:
                    return sequence(raw)
                member = dataclass_members.get(raw[0]) if raw and type(raw[0]) is int else None
                if member is not None:
                    return member(raw)
            elif kind is dict:
                if mapping is not None:
                    return mapping(raw)
            else:
                scalar = scalars.get(kind)
                if scalar is not None:
                    return scalar(raw)
            raise _expected(label, raw)

        return convert


class _Mismatch(Exception):
    """Raised inside conversion, where the path is not known yet: each enclosing converter adds
    its step on the way out, so a message that fits pays for no path strings."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def _expected(label: str, raw: Any) -> _Mismatch:
    return _Mismatch(f"expected {label}, got {_show(raw)}")


def _exact(kind: type, label: str) -> Converter:
    def convert(raw: Any) -> Any:
        if type(raw) is not kind:
            raise _expected(label, raw)
        return raw

    return convert


_INT = _exact(int, "an integer")  # shared: a list of ints takes the one-pass check in _list_of


def _number(raw: Any) -> Any:
    if type(raw) is not float and type(raw) is not int:  # an int stays an int, as it was sent
        raise _expected("a number", raw)
    return raw


def _plain(raw: Any) -> Any:
    """Free-form data (a metrics dict): whatever msgpack built, minus its extension types."""
    kind = type(raw)
    if kind is dict:
        for key, value in raw.items():
            _plain(key)
            try:
                _plain(value)
            except _Mismatch as exc:
                exc.path.append(f"[{key!r}]")
                raise
    elif kind is list:
        for index, value in enumerate(raw):
            try:
                _plain(value)
            except _Mismatch as exc:
                exc.path.append(f"[{index}]")
                raise
    elif kind not in (type(None), bool, int, float, str, bytes):
        raise _expected("plain data", raw)
    return raw


def _list_of(item: Converter, container: type) -> Converter:
    def convert(raw: Any) -> Any:
        if type(raw) is not list:
            raise _expected("an array", raw)
        if item is _INT:  # token ids: the long lists; one pass, no call per element
            if not all(type(v) is int for v in raw):
                raise _expected("integers", raw)
            return raw if container is list else tuple(raw)
        index = 0
        try:
            values = [item(value) for value in raw]
        except _Mismatch as exc:
            for index, value in enumerate(raw):
                try:
                    item(value)
                except _Mismatch:
                    break
            exc.path.append(f"[{index}]")
            raise
        return values if container is list else tuple(values)

    return convert


def _fixed_tuple(items: list[Converter]) -> Converter:
    width = len(items)
    label = f"an array of {width}"

    def convert(raw: Any) -> Any:
        if type(raw) is not list or len(raw) != width:
            raise _expected(label, raw)
        values = []
        for index, (conv, value) in enumerate(zip(items, raw)):
            try:
                values.append(conv(value))
            except _Mismatch as exc:
                exc.path.append(f"[{index}]")
                raise
        return tuple(values)

    return convert


def _dict_of(key: Converter, value: Converter) -> Converter:
    def convert(raw: Any) -> Any:
        if type(raw) is not dict:
            raise _expected("a map", raw)
        converted = {}
        for k, v in raw.items():
            try:
                converted[key(k)] = value(v)
            except _Mismatch as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return converted

    return convert


def _show(raw: Any) -> str:
    text = repr(raw)
    return f"{type(raw).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _describe(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")
