"""Per-device link budget: all of a vehicle's links share its radio, on real loopback sockets in real time.

A vehicle with two neighbours must split its radio between them, not get it twice; and what it receives
costs air time too (`Inbox(bucket=...)`). Rates are measured, with generous tolerances.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq

from flad_core import tensorframe
from flad_core.emulation import Radio
from flad_vehicle.fhdp.links import Inbox, OutLink

ACT = tensorframe.KIND_ACTIVATION
FRAME_FLOATS = 25_000          # 100 kB of fp32 per frame
FRAMES_PER_LINK = 15           # 1.5 MB per neighbour


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def frame(i: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((FRAME_FLOATS,), float(i))}


def send_all(link: OutLink, step: int) -> None:
    for i in range(FRAMES_PER_LINK):
        link.send(frame(i), kind=ACT, step=step, micro_batch=i)


def timed_sends(links: list[OutLink], step: int) -> float:
    """Seconds to push FRAMES_PER_LINK frames down every link at once, one thread per link."""
    with ThreadPoolExecutor(len(links)) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(send_all, link, step) for link in links]
        for future in futures:
            future.result()
        return time.monotonic() - t0


def drain(inbox: Inbox, step: int) -> None:
    for i in range(FRAMES_PER_LINK):
        _, tensors = inbox.get(ACT, step, i, timeout_s=5.0)
        assert torch.equal(tensors["x"], frame(i)["x"])


def test_links_of_one_vehicle_share_its_radio(ctx, port_base):
    """Vehicle A sends 1.5 MB to each of B and C at once: through one 8 Mb/s radio that takes twice as long
    as through a radio per link."""
    inboxes = [Inbox(ctx, f"tcp://127.0.0.1:{port_base + k}") for k in range(2)]
    links: list[OutLink] = []
    try:
        radio = Radio(link_mbps=8, duplex="half")        # 1 MB/s for everything A sends
        shared = [OutLink(ctx, peer, inbox.address, 0, codec="fp32", bucket=radio.send_bucket)
                  for peer, inbox in zip("BC", inboxes, strict=True)]
        own = [OutLink(ctx, peer, inbox.address, 0, codec="fp32", bucket=Radio(link_mbps=8).send_bucket)
               for peer, inbox in zip("BC", inboxes, strict=True)]
        links = shared + own

        shared_s = timed_sends(shared, step=0)
        for inbox in inboxes:
            drain(inbox, step=0)
        own_s = timed_sends(own, step=1)
        for inbox in inboxes:
            drain(inbox, step=1)

        total = sum(link.stats.bytes for link in shared)
        assert radio.send_bucket.sent_bytes == total >= 3_000_000
        assert shared_s >= 2.5, f"3 MB through a shared 1 MB/s radio took only {shared_s:.2f} s"
        assert shared_s >= 1.6 * own_s, f"shared radio {shared_s:.2f} s vs a radio per link {own_s:.2f} s"
    finally:
        for link in links:
            link.close()
        for inbox in inboxes:
            inbox.close()


def test_inbox_charges_received_bytes_to_its_bucket(ctx, port_base):
    """An inbox behind a 4 Mb/s receive budget takes as long to read a burst as the budget allows, however
    fast the (unshaped) sender pushed it."""
    bucket = Radio(link_mbps=4, duplex="full").recv_bucket       # 500 kB/s
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}", bucket=bucket)
    link = OutLink(ctx, "A", inbox.address, 0, codec="fp32", bucket=None)
    try:
        count = 8
        for i in range(count):
            link.send({"x": torch.full((FRAME_FLOATS,), float(i))}, kind=ACT, step=0, micro_batch=i)
        t0 = time.monotonic()
        for i in range(count):
            _, tensors = inbox.get(ACT, 0, i, timeout_s=5.0)
            assert tensors["x"][0].item() == float(i)
        elapsed = time.monotonic() - t0

        assert inbox.received_bytes == link.stats.bytes == bucket.sent_bytes
        expected = inbox.received_bytes / bucket.rate
        assert elapsed >= 0.8 * expected, f"read {inbox.received_bytes} B in {elapsed:.2f} s at {bucket.rate:g} B/s"
        assert inbox.shaping_wait_s > 0
        assert inbox.shaping_wait_s <= elapsed + 0.05
    finally:
        link.close()
        inbox.close()



def test_a_frame_on_the_air_does_not_block_the_receiver(ctx, port_base):
    """Reception takes air time in the background: `has` never sleeps, and says no until the frame is through."""
    bucket = Radio(link_mbps=4).recv_bucket                       # 500 kB/s
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}", bucket=bucket)
    link = OutLink(ctx, "A", inbox.address, 0, codec="fp32", bucket=None)
    try:
        bucket.reserve(int(bucket.burst))                          # start with an empty budget
        link.send({"x": torch.zeros(FRAME_FLOATS)}, kind=ACT, step=0, micro_batch=0)
        airtime = link.stats.bytes / bucket.rate
        t0 = time.monotonic()
        seen_pending = False
        while not inbox.has(ACT, 0, 0):
            seen_pending = seen_pending or bool(inbox._pending.get((ACT, 0, 0)))
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        assert seen_pending                  # it was read off the socket, and held back while on the air
        assert elapsed >= 0.8 * airtime
        t1 = time.monotonic()
        inbox.get(ACT, 0, 0, timeout_s=1.0)
        assert time.monotonic() - t1 < 0.05  # through the radio already: no further wait
    finally:
        link.close()
        inbox.close()
