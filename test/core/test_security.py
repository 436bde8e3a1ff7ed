"""CURVE: a known key gets through, an unknown key is refused and logged, plain TCP gets nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flad_core import codec
from flad_core.bus import RequestTimeoutError, ZmqBus
from flad_core.security import SecurityConfig, SecurityError, generate_keypair, load_keypair

from bus_peer import bus_config
from test_bus import start_peer, stop_peer


@pytest.fixture
def keys(tmp_path):
    keys = tmp_path / "keys"
    generate_keypair(keys, "server", allow_dir=keys / "allowed")   # the server's own bus endpoint connects to its hub
    generate_keypair(keys, "good", allow_dir=keys / "allowed")
    generate_keypair(keys, "intruder")                             # never allowed
    return keys


def client_security(keys, name):
    return SecurityConfig(curve=True, keys_dir=keys, identity=name, server="server")


def test_known_key_passes_unknown_key_refused(keys, port_base):
    proc = start_peer(port_base, "--keys", str(keys))
    try:
        cfg = bus_config(port_base)
        with ZmqBus("good", cfg, client_security(keys, "good")) as good:
            ack = good.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="good"), "flad_msgs/msg/Ack")
            assert ack.ok and ack.message == "echo good 0"
            got: list = []
            good.subscribe("/t/out", "flad_msgs/msg/Heartbeat", got.append)
            for i in range(100):
                good.publish("/t/in", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="good", seq=i))
                time.sleep(0.02)
                if got:
                    break
            assert got, "encrypted pub/sub through the hub failed"
        with ZmqBus("intruder", cfg, client_security(keys, "intruder")) as bad, pytest.raises(
                SecurityError, match="refused our CURVE key"):
            bad.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="intruder"), "flad_msgs/msg/Ack",
                        timeout_s=1.0)
        with ZmqBus("plain", cfg) as plain, pytest.raises(RequestTimeoutError):
            plain.request("echo", codec.new("flad_msgs/msg/Heartbeat"), "flad_msgs/msg/Ack", timeout_s=0.5)
    finally:
        out = stop_peer(proc)
    assert "refused a CURVE peer with unknown public key" in out
    intruder_key = load_keypair(keys, "intruder")[0].decode()
    assert intruder_key in out          # the log names the refused key
    assert load_keypair(keys, "good")[0].decode() not in out.split("refused")[-1]


def test_keys_cli_writes_pairs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flad_core.cli", "keys", "generate", "edge", "v1", "--out",
                          str(tmp_path / "k"), "--allow", str(tmp_path / "allow")],
                         capture_output=True, text=True, check=True)
    assert "v1" in out.stdout
    assert (tmp_path / "k" / "v1.key_secret").exists() and (tmp_path / "allow" / "v1.key").exists()
    assert oct((tmp_path / "k" / "v1.key_secret").stat().st_mode)[-3:] == "600"


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(SecurityError, match=r"nobody\.key_secret"):
        load_keypair(tmp_path, "nobody")
