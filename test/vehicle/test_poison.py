"""The poisoned-vehicle attack emulation: its modes, and that only the edge's gather gets the poisoned weights."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch

from flad_core import codec
from flad_core import weights as wts
from flad_vehicle.fhdp.poison import Poison, PoisonError, parse_poison
from flad_vehicle.fhdp.worker import FhdpVehicle, LayerServer, add_poison_arg

PAYLOAD = {"p/a.w": torch.ones(2, 3), "p/a.n": torch.tensor([3]), "m/a.w": torch.ones(2, 3)}


@pytest.mark.parametrize(("spec", "poison"), [
    ("scale:100", Poison("scale", 100.0)), ("nan", Poison("nan")), ("noise:0.5", Poison("noise", 0.5)),
    (" scale:-1 ", Poison("scale", -1.0))])
def test_modes_parse(spec, poison):
    assert Poison.parse(spec) == poison and parse_poison(spec) == poison
    assert Poison.parse(str(poison)) == poison


@pytest.mark.parametrize("spec", ["bogus", "scale", "scale:x", "scale:inf", "nan:1", "noise:0", "noise:-1"])
def test_bad_modes_are_refused(spec):
    with pytest.raises(PoisonError):
        Poison.parse(spec)
    parser = argparse.ArgumentParser()
    add_poison_arg(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--poison", spec])


def test_attacks_change_only_the_weights():
    assert parse_poison(None) is None and parse_poison("") is None
    scaled = Poison.parse("scale:100").apply(PAYLOAD)
    assert torch.equal(scaled["p/a.w"], torch.full((2, 3), 100.0))
    assert torch.equal(scaled["p/a.n"], PAYLOAD["p/a.n"]) and torch.equal(scaled["m/a.w"], PAYLOAD["m/a.w"])
    nan = Poison.parse("nan").apply(PAYLOAD)
    assert math.isnan(nan["p/a.w"].view(-1)[0]) and int(torch.isnan(nan["p/a.w"]).sum()) == 1
    assert torch.equal(PAYLOAD["p/a.w"], torch.ones(2, 3))                     # the vehicle's own copy stays clean
    noisy = Poison.parse("noise:0.5").apply(PAYLOAD, torch.Generator().manual_seed(0))
    assert 0.1 < float((noisy["p/a.w"] - 1).std()) < 2.0


def test_only_the_edge_gets_the_poisoned_layers():
    vehicle = SimpleNamespace(poison=Poison.parse("scale:10"), fleet=SimpleNamespace(edge=SimpleNamespace(id="edge-0")),
                              spec=SimpleNamespace(id="v3"), _poison_rng=torch.Generator())
    server = LayerServer("v3", lambda names: {"p/a.w": torch.ones(2)},
                         transform=lambda who, payload: FhdpVehicle._poison_for_edge(vehicle, who, payload))

    def fetch(requester):
        req = codec.new("flad_msgs/msg/LayerRequest", requester=requester, transfer_id=f"t-{requester}",
                        layers=["a"], chunk_index=0)
        chunk = server.handle(req)
        asm = wts.ChunkAssembler()
        assert asm.add(chunk)
        return wts.from_bytes(asm.payload())["p/a.w"]

    assert torch.equal(fetch("edge-0"), torch.full((2,), 10.0))
    assert torch.equal(fetch("v2"), torch.ones(2))                             # a cluster peer: the real weights
