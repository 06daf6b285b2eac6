"""The official interleaving of backbone ("M") and MCTP ("m") steps, by name or as a custom list.

A mode is a flat list of pairs [backbone count, MCTP count, ...]; the pairs are consumed in order and
the last pair repeats (tools/inference_sts.py, `_prepare_mtp_for_generation`). An "m" right after an
"M" uses module 0; each further "m" uses the next module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

MODES: dict[str, tuple[int, ...]] = {
    "vanilla": (8192, 0),
    "balance": (1, 4, 3, 8, 4, 10),  # the default of the released generation_config.json
    "boost": (1, 10, 4, 10),
    "turbo": (1, 10),
}
# Bounds on a caller's mode: text length, number of pairs, and a backbone run (vanilla's 8192 is
# already longer than any context); an MCTP run is bounded by the checkpoint's modules.
MAX_MODE_CHARS = 256
MAX_MODE_PAIRS = 32
MAX_BACKBONE_RUN = 8192


@dataclass(frozen=True)
class Schedule:
    pairs: tuple[int, ...]

    @classmethod
    def parse(cls, mode: str | list[int] | tuple[int, ...], num_modules: int) -> "Schedule":
        """A mode name (vanilla, balance, boost, turbo) or a list such as [1, 10, 4, 10] / "1,10,4,10".

        Modes arrive from callers: the text, the number of pairs and every count are bounded, and
        the check runs in time proportional to the number of pairs, never to the counts."""
        if isinstance(mode, str):
            if len(mode) > MAX_MODE_CHARS:
                raise ValueError(f"inference mode is {len(mode)} characters long, at most {MAX_MODE_CHARS}")
            if mode.lower() in MODES:
                pairs = MODES[mode.lower()]
            else:
                try:
                    pairs = tuple(int(p) for p in mode.replace(" ", "").strip("[]").split(","))
                except ValueError:
                    raise ValueError(
                        f"unknown inference mode {mode!r}: use {', '.join(MODES)} or a list like 1,10,4,10"
                    ) from None
        else:
            pairs = tuple(int(p) for p in mode)
        if len(pairs) < 2 or len(pairs) % 2:
            raise ValueError(f"inference mode {list(pairs)[:8]} must be an even-length list of [backbone, mctp] pairs")
        if len(pairs) > 2 * MAX_MODE_PAIRS:
            raise ValueError(f"inference mode has {len(pairs) // 2} pairs, at most {MAX_MODE_PAIRS}")
        if any(p < 0 for p in pairs):
            raise ValueError(f"inference mode {list(pairs)} has a negative count")
        if any(b > MAX_BACKBONE_RUN for b in pairs[::2]):
            raise ValueError(f"inference mode {list(pairs)}: a backbone count is over {MAX_BACKBONE_RUN} "
                             "(vanilla's; a longer run is the same as vanilla)")
        if pairs[0] < 1:
            raise ValueError(f"inference mode {list(pairs)} must start with at least one backbone step")
        if pairs[-2] == 0:
            raise ValueError(f"inference mode {list(pairs)}: the repeating last pair needs a backbone step")
        longest = cls(pairs).longest_mctp_run()
        if longest > num_modules:
            raise ValueError(
                f"inference mode {list(pairs)} asks for {longest} MCTP steps in a row, "
                f"but the checkpoint has {num_modules} MCTP modules"
            )
        return cls(pairs)

    def longest_mctp_run(self) -> int:
        """Most "m" steps between two "M" steps. steps() takes each pair's backbone count, then its
        MCTP count, so a pair with 0 backbone steps joins its MCTP run to the previous one; the
        repeating last pair has a backbone step, so two rounds of it cover every run."""
        run = longest = 0
        for b, m in zip(self.pairs[::2] + self.pairs[-2::2], self.pairs[1::2] + self.pairs[-1::2]):
            run = m if b else run + m
            longest = max(longest, run)
        return longest

    def kinds(self, n: int) -> str:
        """The first n letters of the "M"/"m" string."""
        return "".join(kind for kind, _ in itertools.islice(self.steps(), n))

    def steps(self) -> Iterator[tuple[str, int]]:
        """Endless (kind, module) for new tokens 0, 1, 2, ...; module is -1 for "M"."""
        main, mtp = list(self.pairs[::2]), list(self.pairs[1::2])
        module = -1
        while True:  # the official loop takes the MCTP count, then the backbone count
            m = mtp.pop(0) if len(mtp) > 1 else mtp[0]
            b = main.pop(0) if len(main) > 1 else main[0]
            for _ in range(b):
                module = -1
                yield "M", -1
            for _ in range(m):
                module += 1
                yield "m", module

    def max_module(self) -> int:
        """Highest module index this schedule ever uses (-1 for vanilla)."""
        return max(self.pairs[1::2]) - 1

    def head_length(self) -> int:
        """Number of tokens produced by the non-repeating pairs."""
        return sum(self.pairs[:-2])

    def tail_modules(self) -> int:
        """Modules the repeating last pair uses: modules >= this idle once the head is over."""
        return self.pairs[-1]
