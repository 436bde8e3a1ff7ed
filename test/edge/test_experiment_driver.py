"""The experiment's evaluation stages on real data and real models: the global encoder scored on held-out
vehicles' frames, and the CELLAdapt driver trained per edge and driven in closed loop (tiny sizes, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flad_core.config import ConfigError, from_dict
from flad_edge.experiment.driver import (
    DriverConfig,
    build_encoder,
    encoder_config_for,
    evaluate_driver,
    evaluate_encoder,
    heldout_split,
    load_edge_ad_llm,
    train_driver,
)

TOWNS = {"v000": "Town01", "v001": "Town02", "v002": "Town05"}   # the collector's round-robin over these towns
FRAMES = 8


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 vehicles x 8 frames from the embedded world, one town each, with a small sensor rig."""
    from flad_sim.dataset import CollectConfig, collect

    root = tmp_path_factory.mktemp("driver") / "fleet"
    m = collect(CollectConfig(out=str(root), vehicles=3, frames_per_vehicle=FRAMES, towns=list(TOWNS.values()),
                              front_size=32, side_size=16, lidar_channels=8, lidar_azimuth_steps=64, workers=1),
                progress=False)
    assert {v: info["towns"] for v, info in m["vehicles"].items()} == {v: [t] for v, t in TOWNS.items()}
    return str(root)


@pytest.fixture(scope="module")
def random_state(fleet: str) -> dict[str, torch.Tensor]:
    from flad_vehicle.encoder.model import VisionEncoder

    torch.manual_seed(0)
    return VisionEncoder(encoder_config_for("tiny", fleet)).state_dict()


def _smallest(**kw) -> DriverConfig:
    base = {"general_steps": 2, "distill_steps": 2, "lora_steps": 2, "adm_steps": 2, "batch_size": 4,
            "eval_routes": 1, "eval_towns": ["Town05"], "route_length_m": 50.0, "max_route_s": 8.0}
    return DriverConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(fleet: str, random_state: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("driver_out")
    return train_driver(random_state, fleet, {"e0": ["v000"], "e1": ["v001"], "e2": []}, _smallest(), out, 0), out


# ------------------------------------------------------------------------------------------------ split


def test_heldout_split_keeps_order_and_rejects_what_would_empty_it() -> None:
    assert heldout_split(["v002", "v000", "v001"], TOWNS, ["Town05"]) == (["v000", "v001"], ["v002"])
    assert heldout_split(["v000", "v001"], TOWNS, []) == (["v000", "v001"], [])
    with pytest.raises(ValueError, match="Town07"):
        heldout_split(list(TOWNS), TOWNS, ["Town07"])
    with pytest.raises(ValueError, match="v009"):
        heldout_split(["v000", "v009"], TOWNS, ["Town01"])
    with pytest.raises(ValueError, match="nothing is left to train on"):
        heldout_split(["v002"], TOWNS, ["Town05"])


# ------------------------------------------------------------------------------------------------ encoder


def test_evaluate_encoder_held_out_metrics_are_finite_deterministic_and_move_with_training(
        fleet: str, random_state: dict) -> None:
    from flad_sim.dataset import FleetDataset, iter_batches
    from flad_vehicle.encoder.train import needed_fields

    before = evaluate_encoder(random_state, fleet, ["v002"], "tiny")
    assert before["frames"] == FRAMES
    assert 0.0 <= before["tl_acc"] <= 1.0 and 0.0 <= before["bev_iou"] <= 1.0
    assert all(math.isfinite(before[k]) and before[k] >= 0 for k in ("loss", "wp_l1", "wp_ade", "wp_fde"))
    assert evaluate_encoder(random_state, fleet, ["v002"], "tiny") == before
    capped = evaluate_encoder(random_state, fleet, ["v002", "v001"], "tiny", batch_size=3, max_batches=2)
    assert capped["frames"] == 6

    model = build_encoder(random_state, fleet, "tiny").train()      # a few real training steps, no held-out data
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    shards = FleetDataset.open(fleet).select(vehicles=["v000", "v001"])
    from flad_vehicle.encoder.model import batch_to_torch

    for b in iter_batches(shards, 8, shuffle=True, seed=0, fields=needed_fields(model)):
        loss = model.forward_train(batch_to_torch(b))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_encoder(model.state_dict(), fleet, ["v002"], "tiny")
    assert after["frames"] == FRAMES and 0.0 <= after["tl_acc"] <= 1.0
    assert after["loss"] != before["loss"] and after["wp_l1"] != before["wp_l1"]


def test_evaluate_encoder_names_what_is_wrong(fleet: str, random_state: dict) -> None:
    with pytest.raises(ValueError, match="v042"):
        evaluate_encoder(random_state, fleet, ["v042"], "tiny")
    with pytest.raises(RuntimeError, match="size mismatch"):        # a state of another encoder config
        evaluate_encoder(random_state, fleet, ["v002"], "paper")


# ------------------------------------------------------------------------------------------------ driver


def test_train_driver_writes_cloud_and_per_edge_artifacts(trained: tuple[dict, Path]) -> None:
    res, out = trained
    assert json.loads((out / "driver.json").read_text()) == json.loads(json.dumps(res))
    assert Path(res["encoder_checkpoint"]).is_file()
    assert (Path(res["cloud"]["ad_llm"]) / "celladapt.json").is_file()
    assert sorted(res["edges"]) == ["e0", "e1"] and res["skipped_edges"] == ["e2"]
    for eid, vid in (("e0", "v000"), ("e1", "v001")):
        e = res["edges"][eid]
        assert e["vehicles"] == [vid] and e["towns"] == [TOWNS[vid]] and e["samples"] == FRAMES
        assert (Path(e["adm"]) / "celladapt.json").is_file() and (Path(e["lora"]) / "adapter_config.json").is_file()
        assert 0 < e["lora_trainable_fraction"] < 0.1
        for phase in ("lora", "adm_distill"):
            assert e["phases"][phase]["steps"] == 2 and math.isfinite(e["phases"][phase]["last_loss_mean10"])
    for phase in res["cloud"]["phases"].values():
        assert phase["steps"] == 2 and math.isfinite(phase["first_loss"])
    assert res["samples"] == {"cloud": 2 * FRAMES, "held_out": FRAMES} and res["eval_towns_seen_in_training"] == []
    ol = res["open_loop_held_out"]
    assert set(ol) == {"cloud_ad_llm", "adm[e0]", "adm[e1]", "encoder_head", "constant"}
    assert all(r["samples"] == FRAMES and math.isfinite(r["wp_l1"]) for r in ol.values())
    assert load_edge_ad_llm(res, "e1").is_lora


def test_evaluate_driver_closed_loop_on_the_held_out_town(trained: tuple[dict, Path]) -> None:
    res, out = trained
    cfg = _smallest(baselines=["constant", "expert"])
    ev = evaluate_driver(json.loads((out / "driver.json").read_text()), cfg, out, 0)   # from disk: plain JSON
    assert 0.0 <= ev["RC"] <= 100.0 and 0.0 <= ev["IS"] <= 1.0 and 0.0 <= ev["DS"] <= 100.0
    assert ev["routes"] == 1 and ev["runs"] == 2 and sorted(ev["per_edge"]) == ["e0", "e1"]
    for r in ev["per_route"]:
        assert r["town"] == "Town05" and r["duration_s"] <= 8.0 + 1e-6 and r["plan_ms_mean"] > 0
        assert 0.0 <= r["rc"] <= 100.0 and 0.0 <= r["is"] <= 1.0
        assert r["ds"] == pytest.approx(r["rc"] * r["is"], abs=0.1)
    c = ev["constant_baseline"]
    assert 0.0 <= c["RC"] <= 100.0 and 0.0 <= c["DS"] <= 100.0
    assert ev["baselines"]["expert"]["per_route"][0]["route"] == ev["per_route"][0]["route"]
    assert json.loads((out / "closed_loop.json").read_text()) == json.loads(json.dumps(ev))
    again = evaluate_driver(res, _smallest(baselines=[], eval_edges=["e1"]), out / "again", 0)
    assert [r["rc"] for r in again["per_route"]] == [r["rc"] for r in ev["per_route"] if r["driver"] == "adm[e1]"]
    with pytest.raises(ConfigError, match="eval_edges"):
        evaluate_driver(res, _smallest(eval_edges=["e2"]), out / "bad", 0)
    with pytest.raises(ConfigError, match="closed_loop: 'nodes' renders the default sensor rig"):
        evaluate_driver(res, _smallest(closed_loop="nodes"), out / "bad", 0)
    with pytest.raises(ConfigError, match="route_length_m"):            # no route that short in the town
        evaluate_driver(res, _smallest(route_length_m=2.0), out / "bad", 0)


def test_driver_through_the_deployment_nodes_on_the_default_rig(tmp_path: Path) -> None:
    """closed_loop='nodes': the ADM serves the waypoint service of the node processes; the constant baseline
    drives the identical route in the identical seeded world in-process."""
    from flad_sim.dataset import CollectConfig, collect
    from flad_vehicle.encoder.model import VisionEncoder

    root = tmp_path / "fleet"
    collect(CollectConfig(out=str(root), vehicles=2, frames_per_vehicle=4, towns=["Town01", "Town05"], workers=1),
            progress=False)
    torch.manual_seed(0)
    state = VisionEncoder(encoder_config_for("tiny", root)).state_dict()
    cfg = _smallest(closed_loop="nodes", max_route_s=4.0)
    res = train_driver(state, str(root), {"e0": ["v000"]}, cfg, tmp_path / "out", 1, heldout_root=str(root))
    assert res["samples"] == {"cloud": 4, "held_out": 4} and res["open_loop_held_out"]["adm[e0]"]["samples"] == 4
    ev = evaluate_driver(res, cfg, tmp_path / "out", 1)
    (run,) = ev["per_route"]
    (const,) = ev["baselines"]["constant"]["per_route"]
    assert run["driver"] == "adm[e0]" and run["missed_ticks"] == 0 and Path(run["run"]).is_dir()
    assert run["duration_s"] <= 4.0 + 1e-6 and 0.0 <= ev["DS"] <= 100.0 and 0.0 <= ev["IS"] <= 1.0
    assert (run["route"], run["world_seed"], run["route_length_m"]) == (
        const["route"], const["world_seed"], const["route_length_m"])


def test_disabled_driver_does_nothing(fleet: str, random_state: dict, tmp_path: Path) -> None:
    cfg = DriverConfig(enabled=False)
    assert train_driver(random_state, fleet, {"e0": ["v000"]}, cfg, tmp_path / "d", 0) == {"enabled": False}
    assert evaluate_driver({"enabled": False}, cfg, tmp_path / "d", 0) == {"enabled": False}
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="v077"):
        train_driver(random_state, fleet, {"e0": ["v077"]}, DriverConfig(), tmp_path / "d", 0)


@pytest.mark.parametrize(("data", "key"), [
    ({"lora_steps": 0}, "lora_steps"),
    ({"distill_steps": -3}, "distill_steps"),
    ({"eval_routes": 0}, "eval_routes"),
    ({"eval_towns": []}, "eval_towns"),
    ({"eval_towns": ["Atlantis"]}, "eval_towns"),
    ({"max_route_s": -1.0}, "max_route_s"),
    ({"alpha": 1.5}, "alpha"),
    ({"lr": 0.0}, "lr"),
    ({"route_length_m": 0.0}, "route_length_m"),
    ({"closed_loop": "carla"}, "closed_loop"),
    ({"baselines": ["oracle"]}, "baselines"),
    ({"plan_every": 0}, "plan_every"),
    ({"device": "gpu"}, "device"),
    ({"precision": "fp8"}, "precision"),
])
def test_bad_driver_config_names_the_field(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        DriverConfig(**data).validate()
    assert exc.value.key == key
    with pytest.raises(ConfigError, match=rf"driver\.{key}"):
        from_dict(DriverConfig, data, "driver")


def test_driver_config_from_yaml_types() -> None:
    with pytest.raises(ConfigError, match=r"driver\.lora_steps: expected an integer"):
        from_dict(DriverConfig, {"lora_steps": "many"}, "driver")
    cfg = from_dict(DriverConfig, {"eval_towns": ["Town05", "Town06"], "eval_routes": 3}, "driver")
    assert cfg.eval_towns == ["Town05", "Town06"] and cfg.eval_routes == 3
