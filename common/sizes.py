"""Sizes in bytes: binary units, and the one way they are written and read."""

from __future__ import annotations

from memplug.common.errors import InvalidArgument

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def format_size(n: int) -> str:
    """Short and human: 1 GiB, 2 MiB, 4 KiB, 512 B; one decimal (1.5 KiB) when inexact."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            if n % size == 0:
                return f"{n // size} {unit}"
            if n >= size * 10 or unit == "KiB":
                return f"{n / size:.1f} {unit}"
    return f"{n} B"


_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": TiB, "tb": TiB, "tib": TiB,
}  # fmt: skip


def parse_size(text: str) -> int:
    """'512M', '2G', '1GiB', '0x200000', '4096' -> bytes. Units are binary (K = 1024)."""
    s = text.strip().lower().replace("_", "")
    try:
        if s.startswith("0x"):
            return int(s, 16)
        number = s.rstrip("kmgtib")
        unit = s[len(number) :]
        if unit not in _UNITS or not number:
            raise ValueError(text)
        value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
        whole = int(value)  # OverflowError for inf
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"cannot read {text!r} as a size: use bytes, hex (0x...) or K/M/G/T suffixes"
        ) from None
    if value < 0 or value != whole:
        raise InvalidArgument(f"{text!r} is not a whole number of bytes")
    return whole
