"""The many-streams benchmark's client finds every stamp, however reads split its frames."""

from __future__ import annotations

import asyncio

from scripts.bench_many_streams import merge, quantile_ms
from scripts.bench_sse_client import StreamProtocol, Tally


def frame(sent_ns: int, phase: int) -> bytes:
    data = b'{"details":{"bench_sent_ns":%d,"phase":%d}}' % (sent_ns, phase)
    return b"%x\r\nid: 1-0\ndata: %s\n\n\r\n" % (len(data) + 15, data)


def test_stamps_are_found_across_split_reads() -> None:
    loop = asyncio.new_event_loop()
    try:
        tally = Tally()
        opened: asyncio.Future[None] = loop.create_future()
        protocol = StreamProtocol(b"", tally, opened)
        body = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + frame(1, 0) + frame(2, 0) + frame(3, 1)
        for i in range(0, len(body), 7):  # reads that cut heads, stamps and frames anywhere
            protocol.data_received(body[i : i + 7])
        assert opened.done() and opened.exception() is None
        assert tally.deliveries == 3
        assert sum(tally.phases[0].values()) == 2 and sum(tally.phases[1].values()) == 1
    finally:
        loop.close()


def test_a_refused_stream_fails_its_opening() -> None:
    loop = asyncio.new_event_loop()
    try:
        opened: asyncio.Future[None] = loop.create_future()
        StreamProtocol(b"", Tally(), opened).data_received(b"HTTP/1.1 429 Too Many Requests\r\n\r\n")
        assert isinstance(opened.exception(), RuntimeError)
    finally:
        loop.close()


def test_quantiles_of_merged_histograms() -> None:
    reports = [{"phases": {"0": {"0": 98}}}, {"phases": {"0": {"10": 1, "2499": 1}}}]
    histogram = merge(reports, 0)
    assert quantile_ms(histogram, 0.5) == 0.1
    assert quantile_ms(histogram, 0.99) == 1.1
    assert quantile_ms(histogram, 1.0) == 250.0
    assert quantile_ms({}, 0.99) == 0.0
