"""The cloud process: the second FedAvg tier, over edges.

Each edge uploads its round aggregate (safetensors chunks with its sample count) to `cloud/upload`;
once every expected edge has uploaded or abstained (an upload of 0 samples: an edge with no vehicles this
round), or the deadline passed with a quorum, the cloud averages the
edges by samples -- equal to flat FedAvg over all clients, since each edge aggregate carries its
clients' total -- and serves the new global model on `cloud/global` (LayerRequest with transfer id
`round:<n>`; it answers "not ready" until that round is aggregated).

Crash safety (with a state folder, `--run-dir`): every accepted upload is stored before it is acknowledged,
and every aggregated round's global model with the (edge, update) uploads it counted (`cloud_state.py`). A
restarted cloud reloads them: it serves the global model of every round it has, finishes rounds from the
uploads it had, and never counts an edge's round twice -- an edge re-uploading a round already aggregated
gets an ok ack saying "already counted" and downloads the stored global model. A re-upload of a round not
aggregated yet is idempotent (same update id) or replaces the edge's earlier upload (a redone round).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flad_core import codec
from flad_core import weights as wts
from flad_core.bus import BusError, RemoteError, RequestTimeoutError, ZmqBus
from flad_core.config import ConfigError
from flad_core.procs import install_stop_handlers
from flad_core.protocol import SERVICE_GLOBAL, SERVICE_UPLOAD
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging
from flad_edge.fl.aggregation import AggregationConfig, DistanceHistory, RoundCollector, Update
from flad_edge.fl.cloud_state import CloudStore

log = logging.getLogger("flad_edge.fl.cloud")



class CloudServer:
    """The cloud tier; with `state_dir` its rounds and accepted uploads survive a crash (module docstring)."""

    def __init__(self, fleet, edges: list[str], deadline_s: float = 600.0, bus=None,
                 aggregation: AggregationConfig | None = None, state_dir: Path | str | None = None) -> None:
        self.fleet = fleet
        # how edges are combined and screened; the last global model is the next round's screening reference
        self.aggregation = aggregation if aggregation is not None else AggregationConfig()
        self.global_state: dict[str, torch.Tensor] | None = None
        self.norm_history = DistanceHistory()   # accepted edge updates' distances (norm rule scale)
        self.edges = edges
        self.deadline_s = deadline_s
        self.bus = bus or ZmqBus(fleet.cloud.id, fleet.bus, security_for(fleet, fleet.cloud.id))
        self.rounds: dict[int, RoundCollector] = {}
        self.assemblers: dict[str, wts.ChunkAssembler] = {}
        self.results: dict[int, list] = {}     # round -> chunk messages of the global model
        self.stop = threading.Event()
        self._lock = threading.Lock()
        # crash safety: round -> {edge: update id ("" = abstained)} of every aggregated round, and the state folder
        self.counted: dict[int, dict[str, str]] = {}
        self.store = CloudStore(Path(state_dir)) if state_dir is not None else None
        if self.store is not None:
            self._restore()
        self.bus.serve(SERVICE_UPLOAD, "flad_msgs/msg/WeightChunk", "flad_msgs/msg/Ack", self._on_chunk)
        self.bus.serve(SERVICE_GLOBAL, "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk", self._on_global)

    def _collector(self, rnd: int) -> RoundCollector:
        if rnd not in self.rounds:
            self.rounds[rnd] = RoundCollector(rnd, self.edges, self.deadline_s, quorum=1, config=self.aggregation,
                                              reference=self.global_state, history=self.norm_history)
        return self.rounds[rnd]

    def _on_chunk(self, chunk):
        with self._lock:
            asm = self.assemblers.setdefault(chunk.update_id, wts.ChunkAssembler())
            try:
                if not asm.add(chunk):
                    return codec.new("flad_msgs/msg/Ack", ok=True, message=f"chunk {chunk.chunk_index} stored")
            except wts.WeightsError:
                del self.assemblers[chunk.update_id]    # a bad chunk must not block a later transfer of this id
                raise
            del self.assemblers[chunk.update_id]
            seen = self._seen_before(chunk.sender, int(chunk.round), chunk.update_id)
            if seen is not None:
                return seen
            state = wts.from_bytes(asm.payload(), what=f"upload {chunk.update_id}")
            ok, reason = self._take(chunk.sender, int(chunk.round), chunk.update_id, int(chunk.num_samples), state)
            if ok and self.store is not None:       # durable before the edge hears it was received
                self.store.save_upload(int(chunk.round), chunk.sender, chunk.update_id, int(chunk.num_samples),
                                       state)
            if ok and self._collector(chunk.round).complete():
                self._aggregate(chunk.round)
                self._commit(chunk.round)
        return codec.new("flad_msgs/msg/Ack", ok=ok, message=reason)

    def _take(self, sender: str, rnd: int, update_id: str, samples: int, state) -> tuple[bool, str]:
        """Offer an upload (0 samples: an abstention) to its round's collector."""
        if samples == 0:
            return self._collector(rnd).abstain(sender)
        return self._collector(rnd).offer(Update(sender, rnd, update_id, samples, state))

    def _seen_before(self, sender: str, rnd: int, update_id: str):
        """The ack for an upload of a round already aggregated (counted once: "already counted"; not counted:
        late) or already received (the same update again); None for a new upload. An edge's earlier upload of
        a round not aggregated yet, with another update id (the edge redid the round), is replaced."""
        if rnd in self.counted:
            if sender in self.counted[rnd]:
                held = self.counted[rnd][sender] or "abstention"
                return codec.new("flad_msgs/msg/Ack", ok=True, message=(
                    f"already counted: round {rnd} was aggregated with {sender}'s {held}; "
                    f"its global model is served as round:{rnd}"))
            return codec.new("flad_msgs/msg/Ack", ok=False,
                             message=f"late: round {rnd} was already aggregated without {sender}")
        collector = self.rounds.get(rnd)
        if collector is None:
            return None
        held = collector.updates.get(sender)
        if held is not None and held.update_id == update_id:
            return codec.new("flad_msgs/msg/Ack", ok=True,
                             message=f"already received {update_id}; round {rnd} is not aggregated yet")
        if held is not None:
            del collector.updates[sender]
            collector.seen_ids.discard(held.update_id)
            log.info("round %d: %s uploaded %s, which replaces its %s (not aggregated yet)", rnd, sender, update_id,
                     held.update_id)
        collector.abstained.discard(sender)
        return None

    def _commit(self, rnd: int) -> None:
        """Round `rnd` was just aggregated: remember what it counted, durably if there is a state folder."""
        collector = self.rounds[rnd]
        counted = {c: u.update_id for c, u in collector.updates.items()}
        abstained = sorted(set(collector.abstained) - set(counted))
        self.counted[rnd] = {**counted, **dict.fromkeys(abstained, "")}
        if self.store is None:
            return
        chunks = self.results[rnd]
        self.store.save_round(rnd, wts.join_chunks(chunks) if chunks else None,
                              samples=int(chunks[0].num_samples) if chunks else 0,
                              counted=[{"edge": c, "update_id": u.update_id, "samples": u.num_samples}
                                       for c, u in collector.updates.items()], abstained=abstained)

    def _restore(self) -> None:
        """Reload the state folder: aggregated rounds (served again, never counted again), then pending uploads."""
        assert self.store is not None
        latest = None
        for rnd, (entry, payload) in self.store.rounds().items():
            self.counted[rnd] = {**{c["edge"]: c["update_id"] for c in entry["counted"]},
                                 **dict.fromkeys(entry["abstained"], "")}
            self.results[rnd] = [] if payload is None else wts.chunk_messages(
                payload, sender=self.fleet.cloud.id, update_id=f"global-{rnd}", round=rnd,
                num_samples=int(entry["samples"]))
            latest = payload if payload is not None else latest
        if latest is not None:
            self.global_state = wts.from_bytes(latest, what="the last stored global model")
        pending = 0
        for meta, state in self.store.uploads():
            rnd, sender = int(meta["round"]), str(meta["sender"])
            if rnd in self.counted:
                self.store.drop_upload(rnd, sender)     # its round was aggregated: it is in rounds.json
                continue
            ok, reason = self._take(sender, rnd, str(meta["update_id"]), int(meta["samples"]), state)
            pending += ok
            if not ok:
                log.warning("stored upload of %s for round %d not taken again: %s", sender, rnd, reason)
        for rnd, collector in sorted(self.rounds.items()):
            if rnd not in self.results and collector.complete():
                self._aggregate(rnd)
                self._commit(rnd)
        if self.counted or pending:
            log.info("restored from %s: %d aggregated round(s) %s, %d pending upload(s)", self.store.root,
                     len(self.counted), sorted(self.counted), pending)

    def _aggregate(self, rnd: int) -> None:
        collector = self.rounds[rnd]
        if not collector.updates:
            self.results[rnd] = []      # every edge abstained (or was rejected): no new global model this round
            if collector.rejected:
                log.warning("round %d: no edge update passed validation (%s); the global model stays", rnd,
                            collector.rejected)
            else:
                log.info("round %d: every edge abstained; the global model stays", rnd)
            return
        state, samples = collector.aggregate()
        self.global_state = state
        payload = wts.to_bytes(state, {"round": str(rnd), "samples": str(samples)})
        self.results[rnd] = wts.chunk_messages(payload, sender=self.fleet.cloud.id, update_id=f"global-{rnd}",
                                               round=rnd, num_samples=samples)
        log.info("round %d: global model from %d edge(s), %d samples%s", rnd, len(collector.aggregated_from), samples,
                 f"; rejected {collector.rejected}" if collector.rejected else "")

    def _on_global(self, req):
        rnd = int(req.transfer_id.split(":", 1)[1]) if req.transfer_id.startswith("round:") else -1
        with self._lock:
            if rnd not in self.results and rnd in self.rounds and self.rounds[rnd].can_close():
                self._aggregate(rnd)
                self._commit(rnd)
            chunks = self.results.get(rnd)
        if chunks is None:
            raise LookupError(f"round {rnd} is not aggregated yet")
        if not chunks:
            raise LookupError(f"round {rnd} has no global model: every edge abstained")
        return chunks[req.chunk_index]

    def close(self) -> None:
        self.bus.close()


def upload(bus, state: dict[str, torch.Tensor], *, sender: str, rnd: int, samples: int, update_id: str,
           retry_s: float = 0.0, try_timeout_s: float = 60.0, alive: Callable[[], bool] | None = None) -> str:
    """Send an edge aggregate to the cloud; returns the cloud's final ack message.

    With `retry_s`, a cloud that stops answering (it crashed, and its launcher restarts it) is tried again for
    that long, the whole upload from its first chunk: the cloud keeps what it received, so a repeat with the
    same `update_id` is counted once ("already received" / "already counted"). `alive` (where the caller
    launched the cloud: is its process still running?) ends the retries at once when it says no."""
    chunks = wts.chunk_messages(wts.to_bytes(state), sender=sender, update_id=update_id, round=rnd,
                                num_samples=samples)
    deadline = time.monotonic() + retry_s
    while True:
        _check_alive(alive, f"upload {update_id}")
        try:
            return _send_upload(bus, chunks, update_id, try_timeout_s)
        except (RequestTimeoutError, _IncompleteUploadError) as exc:
            if time.monotonic() >= deadline or (alive is not None and not alive()):
                raise
            log.warning("upload %s to the cloud: %s; sending it again", update_id, exc)
            time.sleep(0.5)


def _check_alive(alive: Callable[[], bool] | None, what: str) -> None:
    if alive is not None and not alive():
        raise BusError(f"{what}: the cloud process is not running")


class _IncompleteUploadError(BusError):
    """The cloud acked the last chunk without having the others (it restarted in between)."""


def _send_upload(bus, chunks: list, update_id: str, timeout_s: float) -> str:
    ack = None
    for chunk in chunks:
        ack = bus.request(SERVICE_UPLOAD, chunk, "flad_msgs/msg/Ack", timeout_s=timeout_s)
        if not ack.ok:
            raise RuntimeError(f"cloud refused upload {update_id}: {ack.message}")
    if ack is not None and len(chunks) > 1 and ack.message.startswith("chunk "):
        raise _IncompleteUploadError(f"the cloud lost earlier chunks ({ack.message})")
    return "" if ack is None else ack.message


def abstain(bus, *, sender: str, rnd: int) -> None:
    """Tell the cloud this edge has no update for round `rnd` (so it does not wait for one)."""
    upload(bus, {}, sender=sender, rnd=rnd, samples=0, update_id=f"{sender}-r{rnd}-abstain")


def download(bus, rnd: int, requester: str, timeout_s: float = 600.0, *, retry: bool = False,
             try_timeout_s: float = 30.0, alive: Callable[[], bool] | None = None
             ) -> dict[str, torch.Tensor] | None:
    """Wait for the cloud's global model of round `rnd` and fetch it (None: every edge abstained).

    With `retry`, a cloud that stops answering is asked again (from the first chunk) until `timeout_s`: a
    restarted cloud serves the rounds it aggregated before, byte for byte. `alive` as for `upload`."""
    deadline = time.monotonic() + timeout_s
    asm = wts.ChunkAssembler()
    index = 0
    while True:
        req = codec.new("flad_msgs/msg/LayerRequest", requester=requester, transfer_id=f"round:{rnd}",
                        chunk_index=index)
        _check_alive(alive, f"global model of round {rnd}")
        try:
            chunk = bus.request(SERVICE_GLOBAL, req, "flad_msgs/msg/WeightChunk", timeout_s=try_timeout_s)
        except RequestTimeoutError as exc:
            if not retry or time.monotonic() > deadline or (alive is not None and not alive()):
                raise
            log.warning("global model of round %d: %s; asking again", rnd, exc)
            asm, index = wts.ChunkAssembler(), 0
            continue
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
    parser = argparse.ArgumentParser(
        prog="flad-cloud", description="Run the cloud aggregator process. With --run-dir, every accepted upload and "
        "aggregated round is kept in RUN_DIR/cloud_state/; started again with the same --run-dir (after a crash), "
        "the cloud reloads it: it serves the stored global models and never counts an edge's round twice.")
    add_role_args(parser)
    parser.add_argument("--edges", nargs="+", default=None, help="edge ids to wait for (default: the fleet's edge)")
    parser.add_argument("--aggregation", default="fedavg", metavar="RULE[,KEY=VALUE...]",
                        help="how edge updates are combined and screened (flad_edge.fl.aggregation.AggregationConfig): "
                             "fedavg, median, trimmed_mean, krum or multi_krum, then options, e.g. "
                             "'trimmed_mean,trim_fraction=0.1' or 'krum,krum_f=1,norm_bound=null'")
    args = parser.parse_args(argv)
    try:
        aggregation = AggregationConfig.parse(args.aggregation)
    except ConfigError as exc:
        parser.error(f"--aggregation: {exc}")
    setup_role_logging(args, "cloud")
    fleet = fleet_from_args(args)
    cloud = CloudServer(fleet, args.edges or [fleet.edge.id], aggregation=aggregation,
                        state_dir=Path(args.run_dir) / "cloud_state" if args.run_dir else None)
    install_stop_handlers(cloud.stop)
    try:
        cloud.stop.wait()
        return 0
    finally:
        cloud.close()


if __name__ == "__main__":
    sys.exit(main())
