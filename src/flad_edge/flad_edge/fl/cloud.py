"""The cloud process: the second FedAvg tier, over edges.

Each edge uploads its round aggregate (safetensors chunks with its sample count) to `cloud/upload`;
once every expected edge has uploaded or abstained (an upload of 0 samples: an edge with no vehicles this
round), or the deadline passed with a quorum, the cloud averages the
edges by samples -- equal to flat FedAvg over all clients, since each edge aggregate carries its
clients' total -- and serves the new global model on `cloud/global` (LayerRequest with transfer id
`round:<n>`; it answers "not ready" until that round is aggregated).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

import torch

from flad_core import codec
from flad_core import weights as wts
from flad_core.bus import ZmqBus
from flad_core.procs import install_stop_handlers
from flad_core.protocol import SERVICE_GLOBAL, SERVICE_UPLOAD
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging
from flad_edge.fl.aggregation import RoundCollector, Update

log = logging.getLogger("flad_edge.fl.cloud")



class CloudServer:
    def __init__(self, fleet, edges: list[str], deadline_s: float = 600.0, bus=None) -> None:
        self.fleet = fleet
        self.edges = edges
        self.deadline_s = deadline_s
        self.bus = bus or ZmqBus(fleet.cloud.id, fleet.bus, security_for(fleet, fleet.cloud.id))
        self.rounds: dict[int, RoundCollector] = {}
        self.assemblers: dict[str, wts.ChunkAssembler] = {}
        self.results: dict[int, list] = {}     # round -> chunk messages of the global model
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.bus.serve(SERVICE_UPLOAD, "flad_msgs/msg/WeightChunk", "flad_msgs/msg/Ack", self._on_chunk)
        self.bus.serve(SERVICE_GLOBAL, "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk", self._on_global)

    def _collector(self, rnd: int) -> RoundCollector:
        if rnd not in self.rounds:
            self.rounds[rnd] = RoundCollector(rnd, self.edges, self.deadline_s, quorum=1)
        return self.rounds[rnd]

    def _on_chunk(self, chunk):
        with self._lock:
            asm = self.assemblers.setdefault(chunk.update_id, wts.ChunkAssembler())
            if not asm.add(chunk):
                return codec.new("flad_msgs/msg/Ack", ok=True, message=f"chunk {chunk.chunk_index} stored")
            del self.assemblers[chunk.update_id]
            state = wts.from_bytes(asm.payload(), what=f"upload {chunk.update_id}")
            if int(chunk.num_samples) == 0:
                ok, reason = self._collector(chunk.round).abstain(chunk.sender)
            else:
                ok, reason = self._collector(chunk.round).offer(
                    Update(chunk.sender, chunk.round, chunk.update_id, int(chunk.num_samples), state))
            if ok and self._collector(chunk.round).complete():
                self._aggregate(chunk.round)
        return codec.new("flad_msgs/msg/Ack", ok=ok, message=reason)

    def _aggregate(self, rnd: int) -> None:
        if not self.rounds[rnd].updates:
            self.results[rnd] = []      # every edge abstained: no new global model this round
            log.info("round %d: every edge abstained; the global model stays", rnd)
            return
        state, samples = self.rounds[rnd].aggregate()
        payload = wts.to_bytes(state, {"round": str(rnd), "samples": str(samples)})
        self.results[rnd] = wts.chunk_messages(payload, sender=self.fleet.cloud.id, update_id=f"global-{rnd}",
                                               round=rnd, num_samples=samples)
        log.info("round %d: global model from %d edge(s), %d samples", rnd, len(self.rounds[rnd].updates), samples)

    def _on_global(self, req):
        rnd = int(req.transfer_id.split(":", 1)[1]) if req.transfer_id.startswith("round:") else -1
        with self._lock:
            if rnd not in self.results and rnd in self.rounds and self.rounds[rnd].can_close():
                self._aggregate(rnd)
            chunks = self.results.get(rnd)
        if chunks is None:
            raise LookupError(f"round {rnd} is not aggregated yet")
        if not chunks:
            raise LookupError(f"round {rnd} has no global model: every edge abstained")
        return chunks[req.chunk_index]

    def close(self) -> None:
        self.bus.close()


def upload(bus, state: dict[str, torch.Tensor], *, sender: str, rnd: int, samples: int, update_id: str) -> None:
    """Send an edge aggregate to the cloud."""
    for chunk in wts.chunk_messages(wts.to_bytes(state), sender=sender, update_id=update_id, round=rnd,
                                    num_samples=samples):
        ack = bus.request(SERVICE_UPLOAD, chunk, "flad_msgs/msg/Ack", timeout_s=60.0)
        if not ack.ok:
            raise RuntimeError(f"cloud refused upload {update_id}: {ack.message}")


def abstain(bus, *, sender: str, rnd: int) -> None:
    """Tell the cloud this edge has no update for round `rnd` (so it does not wait for one)."""
    upload(bus, {}, sender=sender, rnd=rnd, samples=0, update_id=f"{sender}-r{rnd}-abstain")


def download(bus, rnd: int, requester: str, timeout_s: float = 600.0) -> dict[str, torch.Tensor] | None:
    """Wait for the cloud's global model of round `rnd` and fetch it (None: every edge abstained)."""
    from flad_core.bus import RemoteError

    deadline = time.monotonic() + timeout_s
    asm = wts.ChunkAssembler()
    index = 0
    while True:
        req = codec.new("flad_msgs/msg/LayerRequest", requester=requester, transfer_id=f"round:{rnd}",
                        chunk_index=index)
        try:
            chunk = bus.request(SERVICE_GLOBAL, req, "flad_msgs/msg/WeightChunk", timeout_s=30.0)
        except RemoteError as exc:
            if "every edge abstained" in str(exc):
                return None
            if "not aggregated yet" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if asm.add(chunk):
            return wts.from_bytes(asm.payload(), what=f"global model of round {rnd}")
        index += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad-cloud", description="Run the cloud aggregator process.")
    add_role_args(parser)
    parser.add_argument("--edges", nargs="+", default=None, help="edge ids to wait for (default: the fleet's edge)")
    args = parser.parse_args(argv)
    setup_role_logging(args, "cloud")
    fleet = fleet_from_args(args)
    cloud = CloudServer(fleet, args.edges or [fleet.edge.id])
    install_stop_handlers(cloud.stop)
    try:
        cloud.stop.wait()
        return 0
    finally:
        cloud.close()


if __name__ == "__main__":
    sys.exit(main())
