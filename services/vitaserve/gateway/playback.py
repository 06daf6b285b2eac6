"""What the caller heard of an answer: the client's playback reports, checked, and the cut of the
assistant's token ids they imply.

A phone plays an answer later than the gateway sends it (jitter buffer, a generation faster than
real time), so on barge-in "what was sent" overstates what was heard, by up to a whole decoder
block (up to 16 s). A client's PlaybackProgress says how far it played; the turn stored in the
history is cut there, at the audio token, not at a block boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitaserve.common.audio_facts import TOKENS_PER_SECOND

if TYPE_CHECKING:
    from vitaserve.gateway.answer import AnswerProgress

# A client sums AudioChunk.duration_s itself (doubles, in whatever order and rounding it likes), so a
# report of exactly all the audio sent may exceed the server's own sum by float rounding: ~1e-15 s per
# chunk. 1 ms is far above that and far below one audio token (80 ms), so it admits no real overstatement.
PLAYED_SLACK_S = 0.001
# played_s x 12.5 is floored to whole tokens (a token partly heard is not kept); a report of exactly
# k tokens' time must give k, although e.g. 0.56 x 12.5 = 6.999999999999999 in doubles. 1e-6 token
# (80 ns of audio) absorbs that rounding and moves no real report across a token boundary.
TOKEN_ROUNDING = 1e-6


def tokens_heard(played_s: float) -> int:
    """Audio tokens in `played_s` seconds of the answer's audio (12.5 per second), whole tokens only."""
    return max(0, math.floor(played_s * TOKENS_PER_SECOND + TOKEN_ROUNDING))


def heard_ids(ids: list[int], is_audio: Callable[[int], bool], audio_tokens: int) -> list[int]:
    """The prefix of an answer's token ids (text and audio interleaved, as generated) that ends with
    its `audio_tokens`-th audio id: the text before it stays, what comes after (text whose speech was
    not heard, later audio) goes. 0 audio tokens: the text before the first audio id. Asking for more
    audio tokens than `ids` hold: all of `ids` (never more than was sent)."""
    if audio_tokens <= 0:
        for i, token in enumerate(ids):
            if is_audio(token):
                return ids[:i]
        return list(ids)
    seen = 0
    for i, token in enumerate(ids):
        if is_audio(token):
            seen += 1
            if seen == audio_tokens:
                return ids[: i + 1]
    return list(ids)


def report_error(turn: int, seq: int, played_s: float, current_turn: int, chunks_sent: int,
                 audio_sent_s: float) -> str | None:
    """Why a PlaybackProgress of the turn being answered (`current_turn`, which has sent `chunks_sent`
    chunks, `audio_sent_s` seconds) cannot be true; None when it can. The caller has already
    dropped reports of earlier turns (late, harmless)."""
    if turn < 1:
        return f"playback.turn must be >= 1 (an AudioChunk.turn), got {turn}"
    if turn != current_turn:
        return (f"playback.turn {turn} is not a turn of this call being answered "
                f"(the current answer is turn {current_turn})" if current_turn else
                f"playback.turn {turn}: no answer of this call is being sent")
    if not 0 <= seq < chunks_sent:
        return f"playback.seq {seq} of turn {turn}: only chunks 0..{chunks_sent - 1} were sent" if chunks_sent \
            else f"playback.seq {seq} of turn {turn}: no audio of the turn was sent yet"
    if not math.isfinite(played_s) or played_s < 0:
        return f"playback.played_s must be a finite number of seconds >= 0, got {played_s}"
    if played_s > audio_sent_s + PLAYED_SLACK_S:
        return (f"playback.played_s {played_s:.3f} s of turn {turn} exceeds the {audio_sent_s:.3f} s of audio "
                "sent so far")
    return None


@dataclass
class FinishedAnswer:
    """The call's last answer that finished generating and was stored whole, while the caller may
    still be playing it (generation runs faster than real time): its playback reports are still
    taken, and a barge-in on it cuts the stored turn to what the caller heard."""

    turn: int
    user_audio: list[int]
    progress: AnswerProgress  # played_s, played_at: the latest good report, during or after generation

    def unheard_at(self, now: float) -> bool:
        """True when a barge-in at `now` cuts the answer short: the latest report shows less played
        than was sent, and the rest could not have been played since that report at real-time pace.
        A caller that stopped reporting is taken to have played on (its audio kept whole once its
        time ran out); one whose playback stalled is then stored whole as well, as without reports."""
        played, reported_at = self.progress.played_s, self.progress.played_at
        if played is None or reported_at is None:
            return False
        unplayed = self.progress.audio_sent_s - played
        return unplayed > PLAYED_SLACK_S and now < reported_at + unplayed
