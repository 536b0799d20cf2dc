"""What a msgpack document may cost to decode, counted from its headers before anything is built.

msgpack's own limits bound each container (``max_array_len``...), not the whole: 4 MB of nested
empty arrays is four million Python lists, seconds of work for the receiver before any field check
runs. :func:`check_budget` walks the document's type bytes once, skipping strings, binaries and
extensions by their declared length, and stops at the first object past ``max_objects`` or the
first container nested deeper than ``max_depth``. A rejected frame so costs at most
``max_objects`` steps of this loop (about a millisecond per ten thousand), whatever its size.
"""

from __future__ import annotations

MAX_OBJECTS = 20_000  # values in one message (a status reply to a client is the largest: ~100 per node)
MAX_DEPTH = 32  # containers inside containers; messages nest a handful deep

# Type bytes 0xc0..0xdf: (kind, bytes of the header after the type byte). Kinds:
# "fixed" a value of that many bytes, "bytes" a length of that many bytes then that much data,
# "ext" a length, a type byte, then data, "fixext" a type byte then 2**n data, "array"/"map" a count.
_HEADERS: dict[int, tuple[str, int]] = {
    0xC0: ("fixed", 0),  # nil
    0xC2: ("fixed", 0),  # false
    0xC3: ("fixed", 0),  # true
    0xC4: ("bytes", 1),  # bin 8
    0xC5: ("bytes", 2),
    0xC6: ("bytes", 4),
    0xC7: ("ext", 1),  # ext 8
    0xC8: ("ext", 2),
    0xC9: ("ext", 4),
    0xCA: ("fixed", 4),  # float 32
    0xCB: ("fixed", 8),
    0xCC: ("fixed", 1),  # uint 8
    0xCD: ("fixed", 2),
    0xCE: ("fixed", 4),
    0xCF: ("fixed", 8),
    0xD0: ("fixed", 1),  # int 8
    0xD1: ("fixed", 2),
    0xD2: ("fixed", 4),
    0xD3: ("fixed", 8),
    0xD4: ("fixed", 2),  # fixext 1: type byte + 1
    0xD5: ("fixed", 3),
    0xD6: ("fixed", 5),
    0xD7: ("fixed", 9),
    0xD8: ("fixed", 17),
    0xD9: ("bytes", 1),  # str 8
    0xDA: ("bytes", 2),
    0xDB: ("bytes", 4),
    0xDC: ("array", 2),
    0xDD: ("array", 4),
    0xDE: ("map", 2),
    0xDF: ("map", 4),
}


class BudgetError(ValueError):
    """A document holds more objects or deeper nesting than allowed, or ends early."""


def check_budget(data: bytes | memoryview, max_objects: int = MAX_OBJECTS, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`BudgetError` unless the first msgpack object in ``data`` stays within both bounds."""
    size = len(data)
    pos = 0
    objects = 0
    pending = [1]  # objects still to read in each open container, innermost last
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        objects += 1
        if objects > max_objects:
            raise BudgetError(f"more than {max_objects} values in one message")
        if pos >= size:
            raise BudgetError("the message ends in the middle of a value")
        byte = data[pos]
        pos += 1
        if byte < 0x80 or byte >= 0xE0:  # fixint
            continue
        if byte < 0xA0:  # fixmap, fixarray
            count = byte & 0x0F
            if byte < 0x90:
                count *= 2
        elif byte < 0xC0:  # fixstr
            pos += byte & 0x1F
            continue
        else:
            header = _HEADERS.get(byte)
            if header is None:
                raise BudgetError(f"byte {byte:#04x} is not msgpack")
            kind, width = header
            if kind == "fixed":
                pos += width
                continue
            if pos + width > size:
                raise BudgetError("the message ends in the middle of a header")
            count = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if kind == "bytes":
                pos += count
                continue
            if kind == "ext":
                pos += 1 + count
                continue
            if kind == "map":
                count *= 2
        if count:
            if len(pending) > max_depth:
                raise BudgetError(f"values nested more than {max_depth} deep")
            if count > size - pos:  # every value takes a byte at least
                raise BudgetError("a container claims more values than the message holds")
            pending.append(count)
