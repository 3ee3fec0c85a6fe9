"""Property-based tests of the stream scanners (protocol.ClientScanner, ServerScanner).

The relay feeds each scanner whatever recv() returned, cut anywhere: inside a
header, inside a body, between messages, several messages at once. For any
stream of well-framed messages and any cut points, the scanner fed the pieces
must end (and stand after every piece) exactly where one fed the same bytes
in one piece stands, and both must agree with what the message list says:
the same counts, flags, parameters and message boundaries. No I/O, no server.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadpool_proxy import protocol as pq


def frame(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


# Bodies are short or long: long ones span many cuts (the scanner's skip and carry paths).
bodies = st.one_of(st.binary(max_size=12), st.binary(min_size=200, max_size=700))

#: every type a client may send after login, and a few no server takes
CLIENT_TYPES = list(b"QPBDECHSFdcf")
INVALID_CLIENT_TYPES = list(b"yZp\x00\xff")
REQUESTS = set(b"QSF")
UNSYNCING = set(b"PBDEC")


@st.composite
def client_message(draw):
    kind = draw(st.sampled_from(CLIENT_TYPES + [pq.TERMINATE[0]] + INVALID_CLIENT_TYPES))
    return kind, frame(bytes([kind]), draw(bodies))


cstrings = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)


@st.composite
def server_message(draw):
    choice = draw(st.sampled_from("ZSEWGHDCTN"))
    if choice == "Z":
        body = draw(st.sampled_from([b"I", b"T", b"E"]))
    elif choice == "S":
        name, value = draw(cstrings), draw(cstrings)
        body = name.encode() + b"\0" + value.encode() + b"\0"
    elif choice == "E":
        severity = draw(st.sampled_from(["ERROR", "FATAL", "PANIC", "WARNING"]))
        text = draw(cstrings)
        body = (b"S" + severity.encode() + b"\0V" + severity.encode() + b"\0C57P01\0M"
                + text.encode() + b"\0\0")
    else:                                   # types the scanner only frames
        body = draw(bodies)
    return choice.encode()[0], frame(choice.encode(), body)


def cut(stream: bytes, points) -> list:
    points = sorted(set(points))
    edges = [0] + points + [len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


def feed_like_the_relay(scanner, chunk: bytes) -> None:
    """As the relay does: a buffer larger than the chunk, with stale bytes after ``n``."""
    buf = bytearray(b"\xa5" * (len(chunk) + 7))
    buf[:len(chunk)] = chunk
    scanner.feed(memoryview(buf), len(chunk))


def client_state(s: pq.ClientScanner) -> tuple:
    return s.requests, s.unsynced, s.terminated, s.invalid, s.extended, s.at_boundary


def server_state(s: pq.ServerScanner) -> tuple:
    return s.ready, s.xacts, s.status, list(s.parameters), s.errors, s.copy_in, s.fatal, s.at_boundary


def boundaries(messages) -> set:
    offsets, at = {0}, 0
    for _, raw in messages:
        at += len(raw)
        offsets.add(at)
    return offsets


def whole(scanner_class, data: bytes):
    scanner = scanner_class()
    feed_like_the_relay(scanner, data)
    return scanner


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.lists(client_message(), max_size=25), st.data())
def test_client_scanner_frames_any_cut_stream_like_the_whole(messages, data):
    stream = b"".join(raw for _, raw in messages)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    edges = boundaries(messages)
    pieces = cut(stream, points)
    scanner = pq.ClientScanner()
    fed = 0
    for piece in pieces:
        if piece:
            feed_like_the_relay(scanner, piece)
        fed += len(piece)
        prefix = whole(pq.ClientScanner, stream[:fed]) if fed else pq.ClientScanner()
        assert client_state(scanner) == client_state(prefix)
        assert scanner.at_boundary == (fed in edges)
    # and what the message list says
    kinds = [kind for kind, _ in messages]
    assert scanner.requests == sum(kind in REQUESTS for kind in kinds)
    assert scanner.extended == sum(kind in UNSYNCING for kind in kinds)
    invalid = [kind for kind in kinds if kind in INVALID_CLIENT_TYPES]
    assert scanner.invalid == (invalid[0] if invalid else -1)
    assert scanner.terminated == (pq.TERMINATE[0] in kinds or bool(invalid))
    last_sync_or_unsyncing = [kind for kind in kinds if kind == pq.SYNC[0] or kind in UNSYNCING]
    assert scanner.unsynced == bool(last_sync_or_unsyncing and last_sync_or_unsyncing[-1] != pq.SYNC[0])
    assert scanner.at_boundary


@PROPERTY_SETTINGS
@given(st.lists(server_message(), max_size=25), st.data())
def test_server_scanner_frames_any_cut_stream_like_the_whole(messages, data):
    stream = b"".join(raw for _, raw in messages)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    edges = boundaries(messages)
    scanner = pq.ServerScanner()
    fed = 0
    for piece in cut(stream, points):
        if piece:
            feed_like_the_relay(scanner, piece)
        fed += len(piece)
        prefix = whole(pq.ServerScanner, stream[:fed]) if fed else pq.ServerScanner()
        assert server_state(scanner) == server_state(prefix)
        assert scanner.at_boundary == (fed in edges)
    # and what the message list says
    ready = [raw[5] for kind, raw in messages if kind == ord("Z")]
    assert scanner.ready == len(ready)
    assert scanner.xacts == ready.count(ord("I"))
    assert scanner.status == (ready[-1] if ready else ord("I"))
    assert scanner.parameters == [pq.parse_parameter_status(raw[5:]) for kind, raw in messages if kind == ord("S")]
    errors = [pq.parse_error_fields(raw[5:]) for kind, raw in messages if kind == ord("E")]
    assert scanner.errors == len(errors)
    assert scanner.fatal == any(f["S"] in ("FATAL", "PANIC") for f in errors)
    copy_starts = [i for i, (kind, _) in enumerate(messages) if kind in b"GW"]
    ready_at = [i for i, (kind, _) in enumerate(messages) if kind == ord("Z")]
    assert scanner.copy_in == bool(copy_starts and (not ready_at or copy_starts[-1] > ready_at[-1]))


def test_server_scanner_reports_notifications_whole_or_cut_at_every_point():
    """``notified``: the pid offset of each whole NotificationResponse in the chunk, or
    minus the bytes of one the chunk ends inside; ``carry_need`` what completes it."""
    note = frame(b"A", b"\x00\x00\x30\x39" + b"chan\x00payload\x00")
    ready = frame(b"Z", b"I")
    stream = ready + note + ready
    start = len(ready)
    for cut_at in range(len(stream) + 1):
        s = pq.ServerScanner()
        first, rest = stream[:cut_at], stream[cut_at:]
        s.feed(bytearray(first), len(first))
        if cut_at >= start + len(note):
            assert s.notified == [start + 5]
        elif cut_at > start:
            assert s.notified == [-(cut_at - start)]
            assert s.carry_need() == (5 - (cut_at - start) if cut_at - start < 5 else start + len(note) - cut_at)
        else:
            assert s.notified == []
        s.notified.clear()
        while s.carry_need():
            need = s.carry_need()
            s.feed(bytearray(rest[:need]), need)
            rest = rest[need:]
        s.notified.clear()
        s.feed(bytearray(rest), len(rest))
        assert s.at_boundary and s.ready == 2
        # (a cut before it is completed first, so the last piece starts at the message)
        assert s.notified == ([] if cut_at > start else [start + 5 if cut_at == 0 else 5])
