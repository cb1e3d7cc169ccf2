"""The vendor-side SSE decoder: line endings, split points, caps, reads of whole events."""

from __future__ import annotations

import pytest

from providers.base import ProviderProtocolError
from providers.sse import SSEDecoder


def decode(chunks: list[bytes]) -> list[tuple[bytes | None, bytes]]:
    decoder = SSEDecoder(max_line=64, max_event=128)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


def test_events_with_names_and_multiline_data() -> None:
    stream = b"event: a\ndata: 1\ndata: 2\n\n: keep-alive\n\ndata:3\n\n"
    assert decode([stream]) == [(b"a", b"1\n2"), (None, b"3")]


@pytest.mark.parametrize("separator", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(separator: bytes) -> None:
    stream = separator.join([b"data: x", b"", b"event: e", b"data: y", b"", b""])
    assert decode([stream[:n] for n in (len(stream),)]) == [(None, b"x"), (b"e", b"y")]


def test_any_split_point_gives_the_same_events() -> None:
    stream = "data: {\"t\": \"h\u00e9llo \U0001f600\"}\r\n\r\nevent: done\r\ndata: [DONE]\r\n\r\n".encode()
    whole = decode([stream])
    assert whole == [(None, '{"t": "h\u00e9llo \U0001f600"}'.encode()), (b"done", b"[DONE]")]
    for cut in range(1, len(stream)):
        assert decode([stream[:cut], stream[cut:]]) == whole, cut
    assert decode([bytes([b]) for b in stream]) == whole


def test_a_last_event_without_a_blank_line_is_kept() -> None:
    assert decode([b"data: tail"]) == [(None, b"tail")]


def test_line_and_event_caps() -> None:
    with pytest.raises(ProviderProtocolError):
        decode([b"data: " + b"x" * 100])
    with pytest.raises(ProviderProtocolError):
        decode([b"data: " + b"x" * 50 + b"\n"] * 3)


def test_whole_event_reads_decode_as_line_by_line() -> None:
    # Reads that end on event boundaries (the usual read) give what one byte at a time gives.
    stream = (b"data: {\"a\": 1}\n\ndata:no-space\n\nevent: e\ndata: x\n\n: ping\n\ndata: 1\ndata: 2\n\n\n\n"
              b"data: last\n\n")
    by_byte = decode([bytes([b]) for b in stream])
    assert by_byte == [(None, b'{"a": 1}'), (None, b"no-space"), (b"e", b"x"), (None, b"1\n2"), (None, b"last")]
    assert decode([stream]) == by_byte
    events = stream.split(b"\n\n")
    for cut in range(1, len(events)):  # every split at an event boundary
        assert decode([b"\n\n".join(events[:cut]) + b"\n\n", b"\n\n".join(events[cut:])]) == by_byte, cut


def test_event_cap_holds_for_a_whole_event_read() -> None:
    with pytest.raises(ProviderProtocolError):
        decode([b"data: " + b"x" * 200 + b"\n\n"])
