"""Byte counts as an operator reads them: "8MiB", not 8388608.

Two forms: `human_bytes` for figures read at a glance (status, progress, rates: one
decimal from KiB on), and `size_text` for sizes an operator may type back into a config
or a command line (messages about configured sizes): exact, in the largest binary unit
that divides the size, so that `config.parse_size` reads it back as the same number.
"""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
EXACT_DIGITS = 4  # "1536KiB" is still read at a glance; "1048580KiB" is not


def human_bytes(n: float) -> str:
    """1023 -> "1023B", 1536 -> "1.5KiB", 10 << 20 -> "10.0MiB" (the Ansible module
    utils print the same)."""
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def size_text(n: int) -> str:
    """8 << 20 -> "8MiB", 1000 -> "1000B", 1536 -> "1536B"; a size with no short exact
    form is shown rounded with its byte count: "95.4MiB (100000000 bytes)"."""
    number, unit = n, 0
    while unit < len(UNITS) - 1 and number and number % 1024 == 0:
        number //= 1024
        unit += 1
    if len(str(abs(number))) <= EXACT_DIGITS:
        return f"{number}{UNITS[unit]}"
    return f"{human_bytes(n)} ({n} bytes)"
