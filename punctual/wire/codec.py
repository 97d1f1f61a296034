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

Converter = Callable[[Any, str], Any]  # (raw msgpack data, where in the message) -> value


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
        return self.converter(expected)(raw, where)

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
            item = self.converter(args[0])
            return _list_of(item, list)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item = self.converter(args[0])
            return _list_of(item, tuple)
        if origin is tuple and args:
            return _fixed_tuple([self.converter(a) for a in args])
        if origin is dict and len(args) == 2:
            return _dict_of(self.converter(args[0]), self.converter(args[1]))
        raise TypeError(f"the {self.name} schema cannot carry {tp!r}")

    def _dataclass(self, cls: type) -> Converter:
        type_id = self._ids[cls]
        fields = self._fields[cls]
        width = len(fields) + 1
        name = cls.__qualname__
        converters: list[Converter] = []

        def convert(raw: Any, where: str) -> Any:
            if type(raw) is not list or len(raw) != width or raw[0] != type_id or type(raw[0]) is not int:
                raise WireError(f"{where}: expected a {name}, got {_show(raw)}")
            values = [conv(value, f"{where}.{field}") for conv, (field, _), value in zip(converters, fields, raw[1:])]
            try:
                return cls(*values)
            except (TypeError, ValueError) as exc:  # the class's own checks (__post_init__)
                raise WireError(f"{where}: not a valid {name}: {exc}") from None

        self._converters[cls] = convert  # before the fields: a dataclass may nest itself
        converters.extend(self.converter(t) for _, t in fields)
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

        def convert(raw: Any, where: str) -> Any:
            kind = type(raw)
            if kind is list:
                if sequence is not None:
                    return sequence(raw, where)
                member = dataclass_members.get(raw[0]) if raw and type(raw[0]) is int else None
                if member is not None:
                    return member(raw, where)
            elif kind is dict:
                if mapping is not None:
                    return mapping(raw, where)
            else:
                scalar = scalars.get(kind)
                if scalar is not None:
                    return scalar(raw, where)
            raise WireError(f"{where}: expected {label}, got {_show(raw)}")

        return convert


def _exact(kind: type, label: str) -> Converter:
    def convert(raw: Any, where: str) -> Any:
        if type(raw) is not kind:
            raise WireError(f"{where}: expected {label}, got {_show(raw)}")
        return raw

    return convert


_INT = _exact(int, "an integer")  # shared: a list of ints takes the one-pass check in _list_of


def _number(raw: Any, where: str) -> Any:
    if type(raw) is not float and type(raw) is not int:  # an int stays an int, as it was sent
        raise WireError(f"{where}: expected a number, got {_show(raw)}")
    return raw


def _plain(raw: Any, where: str) -> Any:
    """Free-form data (a metrics dict): whatever msgpack built, minus its extension types."""
    kind = type(raw)
    if kind is dict:
        for key, value in raw.items():
            _plain(key, where)
            _plain(value, f"{where}[{key!r}]")
    elif kind is list:
        for index, value in enumerate(raw):
            _plain(value, f"{where}[{index}]")
    elif kind not in (type(None), bool, int, float, str, bytes):
        raise WireError(f"{where}: expected plain data, got {_show(raw)}")
    return raw


def _list_of(item: Converter, container: type) -> Converter:
    def convert(raw: Any, where: str) -> Any:
        if type(raw) is not list:
            raise WireError(f"{where}: expected an array, got {_show(raw)}")
        if item is _INT:  # token ids: the long lists; one pass, no call per element
            if not all(type(v) is int for v in raw):
                raise WireError(f"{where}: expected integers, got {_show(raw)}")
            return raw if container is list else tuple(raw)
        values = [item(value, f"{where}[{index}]") for index, value in enumerate(raw)]
        return values if container is list else tuple(values)

    return convert


def _fixed_tuple(items: list[Converter]) -> Converter:
    width = len(items)

    def convert(raw: Any, where: str) -> Any:
        if type(raw) is not list or len(raw) != width:
            raise WireError(f"{where}: expected an array of {width}, got {_show(raw)}")
        return tuple(conv(value, f"{where}[{index}]") for index, (conv, value) in enumerate(zip(items, raw)))

    return convert


def _dict_of(key: Converter, value: Converter) -> Converter:
    def convert(raw: Any, where: str) -> Any:
        if type(raw) is not dict:
            raise WireError(f"{where}: expected a map, got {_show(raw)}")
        return {key(k, f"{where} key"): value(v, f"{where}[{k!r}]") for k, v in raw.items()}

    return convert


def _show(raw: Any) -> str:
    text = repr(raw)
    return f"{type(raw).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _describe(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")
