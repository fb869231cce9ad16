"""Tests for relay.sse: the WHATWG event-stream decoder and the encoder."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.sse import Event, EventTooLarge, SSEDecoder, comment, encode

Outcome = tuple[list[Event], int | None, str]


def run_feeds(chunks: Iterable[bytes], **kwargs: int) -> Outcome:
    decoder = SSEDecoder(**kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events, decoder.retry, decoder.last_event_id


def decode_every_way(stream: bytes, **kwargs: int) -> Outcome:
    """Decode whole, byte by byte, and split at every point; all must agree."""
    whole = run_feeds([stream], **kwargs)
    bytewise = run_feeds([stream[i : i + 1] for i in range(len(stream))], **kwargs)
    assert bytewise == whole, "byte-by-byte feeding changed the result"
    for cut in range(len(stream) + 1):
        split = run_feeds([stream[:cut], stream[cut:]], **kwargs)
        assert split == whole, f"splitting at byte {cut} changed the result"
    return whole


def events_of(stream: bytes) -> list[Event]:
    return decode_every_way(stream)[0]


# --- parsing rules, each checked under every chunking -----------------------

PARSE_CASES = [
    pytest.param(b"data: hello\n\n", [Event("hello")], id="lf-terminated-block"),
    pytest.param(b"data: hello\r\n\r\n", [Event("hello")], id="crlf-terminated-block"),
    pytest.param(b"data: hello\r\r", [Event("hello")], id="cr-terminated-block"),
    pytest.param(
        b"data: a\r\ndata: b\r\n\r\n", [Event("a\nb")], id="crlf-between-data-lines-is-one-line-end"
    ),
    pytest.param(b"data: a\rdata: b\ndata: c\r\n\n", [Event("a\nb\nc")], id="mixed-line-endings"),
    pytest.param(b"data: a\n\rdata: b\n\n", [Event("a"), Event("b")], id="lf-then-cr-is-two-line-ends"),
    pytest.param(b"data: a\ndata: b\n\n", [Event("a\nb")], id="multiple-data-lines-join-with-lf"),
    pytest.param(b"data:no-space\n\n", [Event("no-space")], id="value-without-space"),
    pytest.param(b"data:  two\n\n", [Event(" two")], id="only-one-leading-space-removed"),
    pytest.param(b"data: trailing \n\n", [Event("trailing ")], id="trailing-space-kept"),
    pytest.param(b"data: a:b: c\n\n", [Event("a:b: c")], id="colon-inside-value-kept"),
    pytest.param(b"data\n\n", [Event("")], id="data-without-colon-is-empty-line"),
    pytest.param(b"data:\n\n", [Event("")], id="empty-data-dispatches-empty-string"),
    pytest.param(b"data\ndata\n\n", [Event("\n")], id="two-empty-data-lines"),
    pytest.param(b"data: a\ndata:\n\n", [Event("a\n")], id="only-one-trailing-lf-stripped"),
    pytest.param(b": comment\ndata: x\n:\n\n", [Event("x")], id="comment-lines-ignored"),
    pytest.param(b":data: x\n\n", [], id="comment-looking-like-data-ignored"),
    pytest.param(b"event: add\ndata: x\n\n", [Event("x", "add")], id="event-type-set"),
    pytest.param(b"event:\ndata: x\n\n", [Event("x")], id="empty-event-type-defaults-to-message"),
    pytest.param(
        b"event: add\ndata: x\n\ndata: y\n\n",
        [Event("x", "add"), Event("y")],
        id="event-type-reset-after-dispatch",
    ),
    pytest.param(
        b"event: add\n\ndata: y\n\n", [Event("y")], id="event-type-reset-by-dataless-block"
    ),
    pytest.param(b"event: a\nevent: b\ndata: x\n\n", [Event("x", "b")], id="last-event-type-wins"),
    pytest.param(b"id: 1\ndata: x\n\n", [Event("x", id="1")], id="id-attached"),
    pytest.param(
        b"id: 1\ndata: x\n\ndata: y\n\n",
        [Event("x", id="1"), Event("y", id="1")],
        id="id-persists-across-events",
    ),
    pytest.param(
        b"id: 1\ndata: x\n\nid\ndata: y\n\n",
        [Event("x", id="1"), Event("y", id="")],
        id="empty-id-resets",
    ),
    pytest.param(
        b"id: 1\ndata: x\n\nid: 2\x003\ndata: y\n\n",
        [Event("x", id="1"), Event("y", id="1")],
        id="id-with-nul-ignored",
    ),
    pytest.param(b"id: 7\n\ndata: y\n\n", [Event("y", id="7")], id="id-from-dataless-block-persists"),
    pytest.param(b"Data: x\ndata : y\n\n", [], id="field-names-are-exact"),
    pytest.param(b"foo: bar\ndata: x\nbaz\n\n", [Event("x")], id="unknown-fields-ignored"),
    pytest.param(b"event: add\nid: 3\nretry: 5\n\n", [], id="dataless-block-dispatches-nothing"),
    pytest.param(b"\n\n\n", [], id="blank-lines-alone-dispatch-nothing"),
    pytest.param(b"data: x\n", [], id="unterminated-event-not-dispatched"),
    pytest.param(b"data: a\n\ndata: b", [Event("a")], id="unterminated-partial-line-not-dispatched"),
    pytest.param(b"\xef\xbb\xbfdata: x\n\n", [Event("x")], id="leading-bom-stripped"),
    pytest.param(
        b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", [], id="second-bom-kept-as-part-of-field-name"
    ),
    pytest.param(
        b"\xef\xbb\xbfdata: \xef\xbb\xbfx\n\n", [Event("\ufeffx")], id="bom-inside-value-kept"
    ),
    pytest.param(
        b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [Event("a")], id="bom-after-start-not-stripped"
    ),
    pytest.param(
        "data: é€😀\n\n".encode(), [Event("é€😀")], id="multibyte-utf8-across-any-split"
    ),
    pytest.param(b"data: \xff\n\n", [Event("\ufffd")], id="invalid-utf8-replaced"),
    pytest.param(b"data: \xe2\x82\n\n", [Event("\ufffd")], id="truncated-utf8-replaced"),
    pytest.param(
        "data: a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\n\n".encode(),
        [Event("a\u2028b\u2029c\x85d\x0be\x0cf\x1cg")],
        id="unicode-line-separators-are-not-line-ends",
    ),
    pytest.param(b"data: a\x00b\n\n", [Event("a\x00b")], id="nul-in-data-kept"),
]


@pytest.mark.parametrize(("stream", "expected"), PARSE_CASES)
def test_decoding_rule_holds_under_every_chunking(stream: bytes, expected: list[Event]) -> None:
    assert events_of(stream) == expected


RETRY_CASES = [
    pytest.param(b"retry: 1500\n", 1500, id="digits-accepted"),
    pytest.param(b"retry:0\n", 0, id="zero-accepted"),
    pytest.param(b"retry: 1500\nretry: 20\n", 20, id="last-valid-wins"),
    pytest.param(b"retry: 1500\nretry: 1.5\n", 1500, id="decimal-ignored"),
    pytest.param(b"retry: -1\n", None, id="negative-ignored"),
    pytest.param(b"retry:\n", None, id="empty-ignored"),
    pytest.param(b"retry\n", None, id="no-colon-ignored"),
    pytest.param(b"retry:  10\n", None, id="extra-space-ignored"),
    pytest.param(b"retry: 10ms\n", None, id="suffix-ignored"),
    pytest.param("retry: ３\n".encode(), None, id="fullwidth-digit-ignored"),
    pytest.param("retry: ²\n".encode(), None, id="superscript-digit-ignored"),
]


@pytest.mark.parametrize(("stream", "expected"), RETRY_CASES)
def test_retry_accepts_only_ascii_digits(stream: bytes, expected: int | None) -> None:
    events, retry, _ = decode_every_way(stream)
    assert events == []
    assert retry == expected


def test_last_event_id_tracks_buffer_including_dataless_blocks() -> None:
    assert decode_every_way(b"id: a\ndata: x\n\nid: b\n\n")[2] == "b"
    assert decode_every_way(b"id: a\n\nid: x\x00\n\n")[2] == "a"


def test_cr_at_end_of_feed_and_lf_at_start_of_next_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"") == []  # an empty feed must not forget the pending CR
    assert decoder.feed(b"\n\r\n") == [Event("a\nb")]


def test_cr_then_lf_split_across_feeds_does_not_swallow_a_later_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"data: b\n") == []  # CR stood alone, LF belongs to a later line
    assert decoder.feed(b"\n") == [Event("a\nb")]


def test_bom_split_across_feeds_stripped_once() -> None:
    decoder = SSEDecoder()
    for byte in b"\xef\xbb\xbf":
        assert decoder.feed(bytes([byte])) == []
    assert decoder.feed(b"data: x\n\n") == [Event("x")]


def test_close_drops_unterminated_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n") == []
    decoder.close()
    assert decoder.feed(b"\n") == []


# --- max_event_size ---------------------------------------------------------


def test_event_at_the_limit_is_accepted() -> None:
    line = b"data: " + b"x" * 94  # 100 bytes of line, 95 of data buffer
    assert decode_every_way(line + b"\n\n", max_event_size=100)[0] == [Event("x" * 94)]


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"data: " + b"x" * 95 + b"\n\n", id="single-line-over"),
        pytest.param(b"data: " + b"x" * 40 + b"\n" + b"data: " + b"y" * 60 + b"\n\n", id="many-lines-sum-over"),
        pytest.param(b"data: " + b"x" * 200, id="unterminated-line-over"),
        pytest.param(b": " + b"x" * 200 + b"\n", id="comment-line-over"),
        pytest.param("data: ".encode() + "é".encode() * 50 + b"\n\n", id="counted-in-utf8-bytes"),
    ],
)
def test_oversized_event_raises_under_every_chunking(stream: bytes) -> None:
    chunkings = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    chunkings += [[stream[:cut], stream[cut:]] for cut in range(len(stream) + 1)]
    for chunks in chunkings:
        with pytest.raises(EventTooLarge, match="event exceeds the 100-byte limit"):
            run_feeds(chunks, max_event_size=100)


def test_huge_line_without_newline_raises_once_past_the_limit() -> None:
    limit = 1 << 20
    decoder = SSEDecoder(max_event_size=limit)
    chunk = b"data: " + b"x" * 4090
    fed = 0
    with pytest.raises(EventTooLarge, match=f"{limit}-byte limit"):
        while fed < 2 * limit:
            decoder.feed(chunk)
            fed += len(chunk)
    assert limit < fed + len(chunk) <= limit + len(chunk)  # raised on the chunk that crossed


def test_oversized_event_keeps_events_completed_earlier_in_the_same_feed() -> None:
    decoder = SSEDecoder(max_event_size=50)
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(b"data: ok\n\ndata: " + b"x" * 100 + b"\n\n")
    assert info.value.events == (Event("ok"),)


def test_decoder_stays_failed_after_event_too_large() -> None:
    decoder = SSEDecoder(max_event_size=10)
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: " + b"x" * 20)
    with pytest.raises(EventTooLarge):
        decoder.feed(b"\n\ndata: ok\n\n")


def test_limit_resets_after_each_dispatch() -> None:
    block = b"data: " + b"x" * 40 + b"\n\n"
    assert events_of(block * 3) == [Event("x" * 40)] * 3
    assert run_feeds([block * 10], max_event_size=50)[0] == [Event("x" * 40)] * 10


@pytest.mark.parametrize("size", [0, -1], ids=["zero", "negative"])
def test_non_positive_limit_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="max_event_size"):
        SSEDecoder(max_event_size=size)


# --- encoder ----------------------------------------------------------------

ENCODE_CASES = [
    pytest.param(dict(data="hi"), b"data: hi\n\n", id="data-only"),
    pytest.param(dict(data=""), b"data: \n\n", id="empty-data-still-one-line"),
    pytest.param(dict(data="a\nb"), b"data: a\ndata: b\n\n", id="lf-splits-lines"),
    pytest.param(dict(data="a\r\nb\rc"), b"data: a\ndata: b\ndata: c\n\n", id="crlf-and-cr-split-lines"),
    pytest.param(dict(data="a\n"), b"data: a\ndata: \n\n", id="trailing-newline-kept"),
    pytest.param(
        dict(data="x", event="delta", id="7", retry=3000),
        b"id: 7\nevent: delta\ndata: x\nretry: 3000\n\n",
        id="all-fields-in-order",
    ),
    pytest.param(dict(data="a\u2028b"), "data: a\u2028b\n\n".encode(), id="u2028-passes-through"),
    pytest.param(dict(data=" lead"), b"data:  lead\n\n", id="leading-space-protected"),
    pytest.param(dict(data="x", id=""), b"id: \ndata: x\n\n", id="empty-id-written"),
]


@pytest.mark.parametrize(("kwargs", "expected"), ENCODE_CASES)
def test_encode_framing(kwargs: dict[str, object], expected: bytes) -> None:
    assert encode(**kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(dict(event="a\nb"), "event type", id="lf-in-event"),
        pytest.param(dict(event="a\rb"), "event type", id="cr-in-event"),
        pytest.param(dict(id="a\nb"), "id", id="lf-in-id"),
        pytest.param(dict(id="a\rb"), "id", id="cr-in-id"),
        pytest.param(dict(id="a\x00b"), "NUL", id="nul-in-id"),
        pytest.param(dict(retry=-1), "retry", id="negative-retry"),
    ],
)
def test_encode_rejects_fields_that_would_break_framing(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode("x", **kwargs)  # type: ignore[arg-type]


def test_comment_is_a_single_line_without_blank_line() -> None:
    assert comment() == b":\n"
    assert comment("keepalive") == b":keepalive\n"
    # Interleaved keepalives must neither dispatch nor split an event.
    assert events_of(b"data: a\n" + comment("ping") + b"data: b\n" + comment() + b"\n") == [Event("a\nb")]


@pytest.mark.parametrize("text", ["a\nb", "a\r"], ids=["lf", "cr"])
def test_comment_rejects_line_breaks(text: str) -> None:
    with pytest.raises(ValueError, match="single line"):
        comment(text)


# --- properties ---------------------------------------------------------------

_TRICKY = st.lists(
    st.sampled_from(["\r", "\n", "\r\n", "\u2028", "\u2029", "", "😀", "é", "a", " ", ":", "\ufeff", "\x00"])
).map("".join)
DATA = st.one_of(st.text(), _TRICKY)
FIELD = st.one_of(st.text(), _TRICKY).map(lambda s: re.sub("[\r\n]", "", s))
IDS = FIELD.map(lambda s: s.replace("\x00", ""))


# On a fresh checkout Hypothesis builds its Unicode tables during the first
# st.text() draw (~1.5 s), which trips too_slow; later runs read them from
# .hypothesis/.  Only that check is relaxed; example counts stay default.
COLD_CACHE_OK = settings(suppress_health_check=[HealthCheck.too_slow])


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@st.composite
def event_specs(draw: st.DrawFn) -> tuple[str, str | None, str | None, int | None]:
    return (
        draw(DATA),
        draw(st.none() | FIELD),
        draw(st.none() | IDS),
        draw(st.none() | st.integers(min_value=0, max_value=10**12)),
    )


@COLD_CACHE_OK
@given(specs=st.lists(event_specs(), max_size=8), data=st.data())
def test_any_chunking_of_encoded_events_decodes_the_same(
    specs: list[tuple[str, str | None, str | None, int | None]], data: st.DataObject
) -> None:
    stream = b"".join(encode(d, event=e, id=i, retry=r) for d, e, i, r in specs)
    expected: list[Event] = []
    last_id, last_retry = "", None
    for d, e, i, r in specs:
        last_id = last_id if i is None else i
        last_retry = last_retry if r is None else r
        expected.append(Event(normalise(d), e or "message", last_id))

    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert run_feeds(chunks) == (expected, last_retry, last_id)
    assert run_feeds(chunks, max_event_size=len(stream) + 16)[0] == expected


@COLD_CACHE_OK
@given(text=DATA, event=FIELD, id=IDS)
def test_decode_inverts_encode(text: str, event: str, id: str) -> None:
    [decoded] = SSEDecoder().feed(encode(text, event=event, id=id))
    assert decoded == Event(normalise(text), event or "message", id)
