"""The vehicle processes of `flad bench pipeline`, seen from the coordinator.

`BenchFleet` spawns one persistent `pipeline_worker` process per cluster member and runs one configuration at a
time on them: a pipeline (`run`) or the fan-in schedule (`run_fanin`). It reads the bench's configuration through
`FleetRunConfig`, so this module does not import `flad_bench.pipeline`.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from typing import Any, Protocol

from flad_bench.pipeline_common import free_ports, summarize
from flad_vehicle.fhdp.pipeline import Pipeline

log = logging.getLogger(__name__)


class FleetRunConfig(Protocol):
    """What `BenchFleet` reads of a bench configuration (`flad_bench.pipeline.BenchConfig` has all of it)."""

    cluster: tuple[tuple[str, str], ...]     # (vehicle, device profile)
    link_setting: str
    radio: str
    base_port: int
    encoder: str
    data: str
    data_owner: str
    batch_size: int
    n_micro: int
    schedule: str
    warmup: int
    seed: int


class BenchFleet:
    """The cluster's vehicle processes (spawned once, reused for every configuration)."""

    def __init__(self, cfg: FleetRunConfig, host_tflops: float, time_scale: float) -> None:
        from flad_bench.pipeline_worker import worker_main
        from flad_core.fleet import PAPER_PROFILES, link_mbps

        self.cfg, self.host_tflops, self.time_scale = cfg, host_tflops, time_scale
        self.device = getattr(cfg, "device", "cpu")     # where every worker's stages run (flad_core.device)
        self.profiles = {v: PAPER_PROFILES[p] for v, p in cfg.cluster}
        self.link_mbps = {v: link_mbps(p, cfg.link_setting) for v, p in cfg.cluster}
        ctx = mp.get_context("spawn")
        self.conns, self.procs = {}, {}
        for v, _ in cfg.cluster:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(v, self.profiles[v].tflops, self.profiles[v].link_mbps, child),
                            daemon=True, name=f"bench-{v}")
            p.start()
            self.conns[v], self.procs[v] = parent, p
        for v, c in self.conns.items():
            if not c.poll(180):
                raise TimeoutError(f"bench worker {v} did not start")
            c.recv()
        self._port = cfg.base_port

    def _addresses(self, k: int) -> list[str]:
        if self._port:
            ports = list(range(self._port, self._port + k))
            self._port += k
        else:
            ports = free_ports(k)
        return [f"tcp://127.0.0.1:{p}" for p in ports]

    def run(self, pipeline: Pipeline, *, steps: int, codec: str = "fp32",
            n_micro: int | None = None, warmup: int | None = None, u_shaped: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        warmup = cfg.warmup if warmup is None else warmup
        log.info("running %s (%s%s, %d steps)", pipeline, codec, ", U-shaped" if u_shaped else "", steps)
        t0 = time.monotonic()
        cmd = {"op": "run", "pipeline": [list(p) for p in pipeline], "addresses": self._addresses(len(pipeline)),
               "codec": codec, "steps": steps, "warmup": warmup, "seed": cfg.seed, "encoder": cfg.encoder,
               "schedule": cfg.schedule, "n_micro": n_micro or cfg.n_micro, "batch_size": cfg.batch_size,
               "time_scale": self.time_scale, "host_tflops": self.host_tflops, "data": cfg.data,
               "data_owner": cfg.data_owner, "u_shaped": u_shaped, "link_mbps": self.link_mbps,
               "radio": cfg.radio, "device": self.device}
        results = self._dispatch(cmd, str(pipeline))
        out = summarize(results, cfg.batch_size, warmup, self.time_scale)
        out["devices"] = sorted({r["device"] for r in results if not r.get("idle") and "device" in r})
        log.info("... %.1f emulated samples/s (%.0f s wall for the configuration)", out["samples_per_s"],
                 time.monotonic() - t0)
        out["codec"] = codec
        out["n_micro"] = cmd["n_micro"]
        out["u_shaped"] = u_shaped
        return out

    def _dispatch(self, cmd: dict[str, Any], what: str, timeout_s: float = 900.0) -> list[dict[str, Any]]:
        for c in self.conns.values():
            c.send(cmd)
        results = []
        for v, c in self.conns.items():
            if not c.poll(timeout_s):
                raise TimeoutError(f"bench worker {v} did not finish {what}")
            r = c.recv()
            if "error" in r:
                raise RuntimeError(f"{v} failed on {what} ({cmd['codec']}): {r['error']}")
            results.append(r)
        return results

    def run_fanin(self, sources: Sequence[str], trunk: Sequence[Sequence], *, steps: int, codec: str = "fp32",
                  warmup: int | None = None) -> dict[str, Any]:
        """The fan-in schedule: every member a source on its own data shard (source i: vehicle v00i's shard),
        the trunk pipeline over `trunk`; samples per step = sources x batch size."""
        cfg = self.cfg
        warmup = cfg.warmup if warmup is None else warmup
        members = list(dict.fromkeys([*sources, *(t[0] for t in trunk)]))
        what = f"fan-in {list(sources)} => {[list(t) for t in trunk]}"
        log.info("running %s (%s, %d steps)", what, codec, steps)
        t0 = time.monotonic()
        ports = self._addresses(len(members))
        cmd = {"op": "run", "fanin": {"sources": list(sources), "trunk": [list(t) for t in trunk]},
               "addresses": dict(zip(members, ports, strict=True)), "codec": codec, "steps": steps, "warmup": warmup,
               "seed": cfg.seed, "encoder": cfg.encoder, "schedule": cfg.schedule, "n_micro": cfg.n_micro,
               "batch_size": cfg.batch_size, "time_scale": self.time_scale, "host_tflops": self.host_tflops,
               "data": cfg.data, "source_data": {v: f"v{i:03d}" for i, v in enumerate(sources)},
               "link_mbps": self.link_mbps, "device": self.device}
        results = self._dispatch(cmd, what, timeout_s=1800.0)
        out = summarize(results, cfg.batch_size * len(sources), warmup, self.time_scale)
        out.update({"codec": codec, "sources": list(sources), "trunk": [list(t) for t in trunk],
                    "samples_per_step": cfg.batch_size * len(sources),
                    "dropped_steps": sum(bool(st.get("dropped")) for r in results if not r.get("idle")
                                         for st in r["steps"]),
                    "radio_wait_s_per_step": {r["vehicle"]: r["radio_wait_s_per_step"] / self.time_scale
                                              for r in results if not r.get("idle")},
                    "peer_bytes_per_step": {r["vehicle"]: r["link_bytes_per_step"]["peers"]
                                            for r in results if not r.get("idle")}})
        log.info("... %.1f emulated samples/s (%.0f s wall)", out["samples_per_s"], time.monotonic() - t0)
        return out

    def close(self) -> None:
        for c in self.conns.values():
            with contextlib.suppress(BrokenPipeError, OSError):
                c.send({"op": "stop"})
        for p in self.procs.values():
            p.join(10)
            if p.is_alive():
                p.terminate()
