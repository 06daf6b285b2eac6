"""The cut of an interrupted answer at what the caller heard, and the checks of a playback report
(gateway/playback.py): plain functions, no servers."""

from __future__ import annotations

import math

import pytest

from vitaserve.gateway.answer import AnswerProgress
from vitaserve.gateway.playback import PLAYED_SLACK_S, FinishedAnswer, heard_ids, report_error, tokens_heard

AUDIO0 = 1000  # ids from here on are audio in these tests


def is_audio(token: int) -> bool:
    return token >= AUDIO0


# text 1 2, audio a0 a1, text 3, audio a2, text 4 5, audio a3 a4 a5, text 6
IDS = [1, 2, AUDIO0, AUDIO0 + 1, 3, AUDIO0 + 2, 4, 5, AUDIO0 + 3, AUDIO0 + 4, AUDIO0 + 5, 6]


@pytest.mark.parametrize("audio_tokens, expected", [
    (0, [1, 2]),                                               # nothing heard: the text before any audio
    (1, [1, 2, AUDIO0]),
    (2, [1, 2, AUDIO0, AUDIO0 + 1]),                           # text 3 follows the 2nd audio id: cut
    (3, [1, 2, AUDIO0, AUDIO0 + 1, 3, AUDIO0 + 2]),            # text between the 2nd and 3rd stays
    (4, [1, 2, AUDIO0, AUDIO0 + 1, 3, AUDIO0 + 2, 4, 5, AUDIO0 + 3]),
    (6, IDS[:-1]),                                             # all audio heard: the trailing text goes
    (7, IDS),                                                  # more than was sent: what was sent
    (500, IDS),
])
def test_the_cut_keeps_the_text_interleaved_before_the_last_audio_token_heard(audio_tokens, expected):
    assert heard_ids(IDS, is_audio, audio_tokens) == expected


def test_the_cut_of_an_answer_without_audio_or_empty_is_all_of_it():
    assert heard_ids([1, 2, 3], is_audio, 0) == [1, 2, 3]
    assert heard_ids([1, 2, 3], is_audio, 4) == [1, 2, 3]
    assert heard_ids([], is_audio, 3) == []
    assert heard_ids([AUDIO0, 1], is_audio, 0) == []  # audio first: nothing heard is nothing at all


@pytest.mark.parametrize("played_s, tokens", [
    (0.0, 0), (0.079, 0), (0.08, 1), (0.4, 5), (0.44, 5), (0.56, 7), (1.0, 12), (1.04, 13), (16.0, 200),
])
def test_seconds_played_are_whole_tokens_at_12_5_per_second(played_s, tokens):
    assert tokens_heard(played_s) == tokens


def test_every_k_token_time_gives_k_despite_float_rounding():
    # k / 12.5 seconds is k tokens' audio exactly; its double times 12.5 may fall just under k
    assert all(tokens_heard(k / 12.5) == k for k in range(0, 5000))
    assert all(tokens_heard(k * 0.08) == k for k in range(0, 5000))


def check(turn=3, seq=1, played_s=0.5, current_turn=3, chunks_sent=2, audio_sent_s=1.6):
    return report_error(turn, seq, played_s, current_turn, chunks_sent, audio_sent_s)


def test_a_true_report_passes():
    assert check() is None
    assert check(seq=0, played_s=0.0) is None
    assert check(played_s=1.6) is None                       # all of it played
    assert check(played_s=1.6 + PLAYED_SLACK_S / 2) is None  # the client's own float sum of the durations


@pytest.mark.parametrize("kw, words", [
    (dict(turn=0), "must be >= 1"),
    (dict(turn=-2), "must be >= 1"),
    (dict(turn=4), "current answer is turn 3"),
    (dict(turn=2), "current answer is turn 3"),
    (dict(turn=1, current_turn=0, chunks_sent=0, audio_sent_s=0.0), "no answer"),
    (dict(seq=2), "only chunks 0..1"),
    (dict(seq=-1), "only chunks 0..1"),
    (dict(seq=0, chunks_sent=0, audio_sent_s=0.0), "no audio of the turn"),
    (dict(played_s=-0.01), "finite number"),
    (dict(played_s=math.nan), "finite number"),
    (dict(played_s=math.inf), "finite number"),
    (dict(played_s=1.6 + 2 * PLAYED_SLACK_S), "exceeds"),
    (dict(played_s=1e300), "exceeds"),
])
def test_a_report_that_cannot_be_true_says_why(kw, words):
    problem = check(**kw)
    assert problem is not None and words in problem and "playback." in problem


def finished(sent_s: float, played_s: float | None, at: float | None) -> FinishedAnswer:
    return FinishedAnswer(1, [7], AnswerProgress(audio_sent_s=sent_s, played_s=played_s, played_at=at))


@pytest.mark.parametrize("answer, now, cut", [
    (finished(5.0, None, None), 100.0, False),        # no report: stored whole, as sent
    (finished(5.0, 0.4, 100.0), 100.1, True),         # 4.6 s left to play, barge-in 0.1 s after the report
    (finished(5.0, 0.4, 100.0), 104.59, True),
    (finished(5.0, 0.4, 100.0), 104.6, False),        # the rest could have played since: whole
    (finished(5.0, 5.0, 100.0), 100.0, False),        # all of it played
    (finished(5.0, 5.0 - PLAYED_SLACK_S / 2, 100.0), 100.0, False),  # all of it, up to a client's rounding
])
def test_a_finished_answer_is_cut_only_while_the_report_shows_it_still_playing(answer, now, cut):
    assert answer.unheard_at(now) is cut
