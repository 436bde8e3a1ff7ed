"""With `security.curve: true`, every TCP port a FLAD process listens on is a CURVE server behind the allow-list.

Real processes with generated keys -- an edge (bus hub + service ROUTER), the cloud, an FHDP vehicle worker
(control ROUTER + stage inbox) and a waypoint service -- are started on loopback; psutil lists each one's
LISTEN sockets, every one of which must be a port the fleet names (so a new, unsecured listener fails this
test). Each port is then probed with a ZeroMQ socket of a compatible type and a monitor on the handshake:
  (a) a plaintext client never completes a handshake,
  (b) a CURVE client with a key outside the allow-list is refused (EVENT_HANDSHAKE_FAILED_AUTH),
  (c) a CURVE client with an allow-listed key gets through (the positive control).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
import zmq
import zmq.utils.monitor

from flad_core.config import to_dict
from flad_core.fleet import VehicleSpec, load_fleet, with_port_base
from flad_core.procs import ProcessGroup, python_module_cmd
from flad_core.roles import default_fleet_path
from flad_core.security import generate_keypair, load_keypair, load_public

from flad_testing import free_port_base

EDGE, CLOUD, VEHICLE = "edge-0", "cloud", "v000"
#: an allow-listed key that belongs to no process (the positive control) and one that is not allow-listed
PROBE, INTRUDER = "probe", "intruder"
#: how long a plaintext client gets to (not) complete its handshake
PLAINTEXT_WAIT_S = 2.0
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_DISCONNECTED)

#: a waypoint service process with the edge's credentials and a constant predictor (no model needed)
WAYPOINT_SCRIPT = """
import sys, threading, torch
from flad_core.fleet import load_fleet
from flad_core.roles import security_for
from flad_edge.celladapt.service import ServiceConfig, WaypointService
fleet = load_fleet(sys.argv[1])
svc = WaypointService(lambda f, *_: torch.zeros(f.shape[0], 5, 2), (4, 8), ServiceConfig(address=sys.argv[2]),
                      security=security_for(fleet, fleet.edge.id))
svc.start()
threading.Event().wait()
"""


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def secured_fleet(tmp_path_factory):
    """(fleet, keys, {process: pid}, {port: (socket type to probe with, server key name)}) of running processes."""
    work = tmp_path_factory.mktemp("socket-security")
    keys, allowed = work / "keys", work / "keys" / "allowed"
    for name in (EDGE, CLOUD, VEHICLE, PROBE):
        generate_keypair(keys, name, allow_dir=allowed)
    generate_keypair(keys, INTRUDER)
    base = free_port_base(16)
    fleet = load_fleet(default_fleet_path())
    fleet = dataclasses.replace(fleet, vehicles=[VehicleSpec(id=VEHICLE, profile="jetson_agx", predicted_dwell_s=900,
                                                             control="tcp://127.0.0.1:7200",
                                                             data="tcp://127.0.0.1:7201")])
    fleet = with_port_base(fleet, base)
    fleet = dataclasses.replace(fleet, security=dataclasses.replace(fleet.security, curve=True, keys_dir=keys,
                                                                    allow_dir=allowed, server=EDGE))
    fleet_file = work / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    waypoint = f"tcp://127.0.0.1:{base + 15}"
    common = ["--fleet", str(fleet_file), "--run-dir", str(work / "logs")]
    edge_services = {_port(fleet.bus.services["edge/register"])}    # the FL edge serves registration
    cloud_services = {_port(a) for s, a in fleet.bus.services.items() if s.startswith("cloud/")}
    v = fleet.vehicles[0]
    expected = {
        "edge": {_port(fleet.bus.hub_pub): (zmq.PUB, EDGE), _port(fleet.bus.hub_sub): (zmq.SUB, EDGE),
                 **{p: (zmq.DEALER, EDGE) for p in edge_services}},
        "cloud": {p: (zmq.DEALER, CLOUD) for p in cloud_services},
        "vehicle": {_port(v.control): (zmq.DEALER, VEHICLE), _port(v.data): (zmq.PUSH, VEHICLE)},
        "waypoint": {_port(waypoint): (zmq.DEALER, EDGE)},
    }
    group = ProcessGroup(grace_s=5.0)
    env = {"OMP_NUM_THREADS": "1"}
    try:
        group.start("edge", python_module_cmd("flad_edge.fl.edge_server", *common, "--duration", "600"), env=env)
        group.start("cloud", python_module_cmd("flad_edge.fl.cloud", *common), env=env)
        group.start("vehicle", python_module_cmd("flad_vehicle.fhdp.worker", *common, "--id", VEHICLE,
                                                 "--data", "synthetic"), env=env)
        group.start("waypoint", [sys.executable, "-c", WAYPOINT_SCRIPT, str(fleet_file), waypoint],
                    log_path=work / "waypoint.stderr", env=env)
        pids = {name: proc.pid for name, proc in group.procs.items()}
        _wait_listening(group, pids, expected, work)
        yield fleet, keys, pids, expected
    finally:
        group.stop()


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def _wait_listening(group: ProcessGroup, pids: dict[str, int], expected: dict[str, dict], work: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        dead = {n: p.returncode for n, p in group.procs.items() if p.poll() is not None}
        if dead:
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(work.rglob("*.log"))
                             ) + "\n".join(f.read_text()[-2000:] for f in work.glob("*.stderr"))
            raise AssertionError(f"processes exited early: {dead}\n{logs}")
        if all(set(expected[name]) <= listening_ports(pid) for name, pid in pids.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"not every port came up: { {n: listening_ports(p) for n, p in pids.items()} }")


class Probe:
    """A client socket of `sock_type` connecting to `port`, plaintext or CURVE, with its handshake monitored."""

    def __init__(self, ctx: zmq.Context, port: int, sock_type: int, keys: Path | None = None, name: str = "",
                 server: str = "") -> None:
        self.port = port
        self.sock = ctx.socket(sock_type)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey = load_keypair(keys, name)
            self.sock.curve_serverkey = load_public(keys, server)
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.events: list[int] = []
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def collect(self, timeout_s: float, until: int | None = None) -> list[int]:
        """Monitor events seen within `timeout_s` (returns early once `until` is seen)."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if until is not None and until in self.events:
                break
            if self.monitor.poll(int(remaining * 1000) + 1):
                self.events.append(zmq.utils.monitor.recv_monitor_message(self.monitor)["event"])
        return self.events

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def _all_ports(expected: dict[str, dict]) -> dict[int, tuple[int, str]]:
    return {port: how for ports in expected.values() for port, how in ports.items()}


def test_every_listening_port_is_one_the_fleet_names(secured_fleet):
    _, _, pids, expected = secured_fleet
    for name, pid in pids.items():
        assert listening_ports(pid) == set(expected[name]), name


def test_a_plaintext_client_never_completes_a_handshake(secured_fleet):
    _, _, _, expected = secured_fleet
    ctx = zmq.Context()
    probes = [Probe(ctx, port, sock_type) for port, (sock_type, _) in _all_ports(expected).items()]
    try:
        time.sleep(PLAINTEXT_WAIT_S)     # every probe had the whole wait; then read what each one saw
        for p in probes:
            events = p.collect(0.05)
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, f"port {p.port} accepted a plaintext client"
    finally:
        for p in probes:
            p.close()
        ctx.term()


def test_an_unknown_key_is_refused_and_an_allowed_key_gets_through(secured_fleet):
    _, keys, _, expected = secured_fleet
    ctx = zmq.Context()
    ports = _all_ports(expected)
    bad = [Probe(ctx, port, sock_type, keys, INTRUDER, server) for port, (sock_type, server) in ports.items()]
    good = [Probe(ctx, port, sock_type, keys, PROBE, server) for port, (sock_type, server) in ports.items()]
    try:
        for p in bad:
            events = p.collect(10.0, until=zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events, f"port {p.port}: {events}"
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, f"port {p.port} let an unknown key in"
        for p in good:
            events = p.collect(10.0, until=zmq.EVENT_HANDSHAKE_SUCCEEDED)
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED in events, f"port {p.port} refused an allow-listed key: {events}"
    finally:
        for p in bad + good:
            p.close()
        ctx.term()
