"""`TextStream`: what a sequence may send after each token, without a model."""

from __future__ import annotations

from workers.engine.textstream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(p) for p in pieces]


def test_a_character_split_across_tokens_goes_out_whole() -> None:
    snowman = "☃".encode()
    s = TextStream([])
    assert feed_all(s, [b"a", snowman[:1], snowman[1:2], snowman[2:] + b"b"]) == ["a", "", "", "☃b"]
    assert s.decoded == s.sent == 3


def test_a_stop_string_across_tokens_is_held_then_cut() -> None:
    s = TextStream(["END"])
    assert feed_all(s, [b"one E", b"N", b"D two"]) == ["one ", "", ""]
    assert s.stopped and s.sent == 4


def test_a_held_prefix_that_is_not_a_stop_goes_out() -> None:
    s = TextStream(["END"])
    assert feed_all(s, [b"say E", b"NOUGH"]) == ["say ", "ENOUGH"]
    assert not s.stopped


def test_the_end_releases_what_was_held() -> None:
    s = TextStream(["###"])
    assert s.feed(b"x ##") == "x "
    assert s.flush() == "##"
    assert not s.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    s = TextStream(["b", "abc"])
    assert s.feed(b"xxabc") == "xx"
    assert s.stopped and s.matched == "abc"  # what Anthropic's stop_sequence reports


def test_a_character_cut_by_the_end_goes_out_as_u_fffd_of_the_last_token() -> None:
    s = TextStream([])
    assert feed_all(s, [b"Hi ", "☃".encode()[:2]]) == ["Hi ", ""]
    assert s.last == ""  # the token decoded to nothing yet
    assert s.flush() == "\ufffd" and s.tail == "\ufffd"  # what the logprobs give that token
    assert s.decoded == s.sent == 4
