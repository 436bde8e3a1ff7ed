"""Closed loop in the embedded world: sensors → encoder → waypoint service (real sockets) → PID → control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flad_core.bus import BusConfig, ZmqBus
from flad_sim.agent import RouteRunner
from flad_sim.world import World
from flad_vehicle.control.agent import (
    ConstantWaypointAgent,
    WaypointAgent,
    lazy_sensor_observer,
    resample,
    route_spec,
    to_frame,
)
from flad_vehicle.encoder import VisionEncoder

torch.set_num_threads(1)


def test_resample_and_frames() -> None:
    wp = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]])
    np.testing.assert_allclose(resample(wp, 0.0), wp)
    np.testing.assert_allclose(resample(wp, 0.25), wp + np.array([0.5, 0.0]))
    np.testing.assert_allclose(resample(wp, 0.5)[-1], [6.0, 0.0])          # extrapolated past the plan
    pts = np.array([[1.0, 0.0]])
    # ego moved 1 m forward and turned 90 deg left: the point that was 1 m ahead is now at the origin,
    # and a point 1 m to the old left is now 1 m to the right... of the new heading's frame
    np.testing.assert_allclose(to_frame(pts, (0, 0, 0), (1, 0, math.pi / 2)), [[0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(to_frame(np.array([[2.0, 0.0]]), (0, 0, 0), (0, 0, math.pi / 2)), [[0.0, -2.0]],
                               atol=1e-12)


@pytest.fixture(scope="module")
def route():
    return route_spec("Town05", 3, 1)[0]


def test_constant_baseline_drives_and_is_scored(route) -> None:
    w = World("Town05", seed=11)
    agent = ConstantWaypointAgent(np.array([[1.5, 0.0], [3.0, 0.0], [4.5, 0.0], [6.0, 0.0], [7.5, 0.0]]))
    rec = RouteRunner(w, route, agent, max_ticks=120).run()
    assert rec.rc > 0 and 0 <= rec.is_ <= 1 and rec.ds == pytest.approx(rec.rc * rec.is_)


def test_encoder_service_pid_loop_over_sockets(route) -> None:
    from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama
    from flad_edge.celladapt.service import ServiceConfig, WaypointClient, WaypointService, free_tcp_address

    encoder = VisionEncoder("tiny")
    adm = ADLLM.build(ADLLMConfig(llm=tiny_llama(32, 1, 4, 2), adapter=AdapterConfig(d_model=32, n_queries=2)))
    addr = free_tcp_address()
    bus = ZmqBus("v000", BusConfig())
    seen: list[tuple[str, str]] = []
    try:
        with WaypointService.for_model(adm, ServiceConfig(address=addr, max_wait_ms=1.0)) as svc:
            client = WaypointClient(bus, addr, timeout_s=5.0)

            def source(features: torch.Tensor, instruction: str, notice: str, target_point: np.ndarray
                       ) -> np.ndarray:
                seen.append((instruction, notice))
                assert target_point.shape == (2,) and np.isfinite(target_point).all()
                return client.waypoints(features, instruction, notice, vehicle_id="v000", target_point=target_point)

            agent = WaypointAgent(encoder, source, plan_every=5)
            w = World("Town05", seed=11)
            controls = []
            rec = RouteRunner(w, route, agent, observe=lazy_sensor_observer(),
                              on_tick=lambda *a: controls.append(a[3]), max_ticks=20).run()
            assert svc.stats.replies_ok == 4
    finally:
        bus.close()
    assert len(controls) == 20 and all(0 <= c.throttle <= 1 and -1 <= c.steer <= 1 for c in controls)
    assert len(seen) == 4 and all(ins for ins, _ in seen)
    assert rec.status in ("running", "completed") or rec.duration_s > 0
