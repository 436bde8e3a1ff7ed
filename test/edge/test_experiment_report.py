"""The experiment's report and telemetry on synthetic but well-formed run folders (no runner needed)."""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from flad_edge.experiment import report as rep
from flad_edge.experiment import telemetry as tel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _round_record(r: int, *, loss: float, with_global: bool = True) -> dict[str, Any]:
    edges = {
        "e0": {"in_coverage": 20 + r, "eligible": 15, "sufficient": ["v01", "v02"], "limited": ["v03", "v04", "v05"],
               "clusters": [["v03", "v04", "v05"]], "clients": ["v01", "v02", "c-e0-0"], "accepted": 3,
               "samples": 96, "moved_bytes": 4_000_000 + 100_000 * r, "train_loss": loss + 0.01,
               "recoveries": 1 if r == 2 else 0, "handovers": r % 2},
        "e1": {"in_coverage": 18, "eligible": 12, "sufficient": ["v10"], "limited": ["v11", "v12"],
               "clusters": [["v11", "v12"]], "clients": ["v10", "c-e1-0"], "accepted": 2, "samples": 64,
               "moved_bytes": 3_000_000, "train_loss": loss - 0.01, "recoveries": 0, "handovers": 1},
    }
    rec: dict[str, Any] = {
        "event": "round", "round": r, "sim_time_s": 60.0 * r, "train_loss": loss, "samples": 160, "accepted": 5,
        "moved_bytes": 7_500_000 + 100_000 * r,
        "wall": {"planning_s": 0.2, "training_s": 3.0 + r, "aggregation_s": 0.1, "overhead_s": 0.4,
                 "total_s": 3.7 + r},
        "edges": edges,
    }
    if with_global:
        rec["global"] = {"loss": loss + 0.1, "tl_acc": 0.5 + 0.1 * r, "wp_l1": 1.0 - 0.1 * r}
    return rec


def _fleet(r: int) -> dict[str, Any]:
    vehicles = []
    roles = {"v01": ("solo", "v01", "e0"), "v02": ("solo", "v02", "e0"), "v03": ("cluster", "c-e0-0", "e0"),
             "v04": ("cluster", "c-e0-0", "e0"), "v05": ("cluster", "c-e0-0", "e0"), "v10": ("solo", "v10", "e1"),
             "v11": ("cluster", "c-e1-0", "e1"), "v12": ("cluster", "c-e1-0", "e1"), "v20": ("idle", None, "e0"),
             "v21": ("ineligible", None, "e1"), "v30": ("outside", None, None)}
    for i, (vid, (role, client, edge)) in enumerate(roles.items()):
        vehicles.append({"id": vid, "x": 40.0 * i + 5 * r, "y": 30.0 + 25.0 * (i % 4), "town": "Town01" if i < 6
                         else "Town02", "edge": edge, "client": client, "role": role})
    return {"round": r, "sim_time_s": 60.0 * r,
            "tiles": [{"name": "Town01", "x0": 0, "y0": 0, "x1": 220, "y1": 150},
                      {"name": "Town02", "x0": 220, "y0": 0, "x1": 440, "y1": 150}],
            "edges": [{"id": "e0", "x": 110, "y": 75, "radius_m": 120}, {"id": "e1", "x": 330, "y": 75,
                                                                        "radius_m": 100}],
            "vehicles": vehicles}


def _write_jsonl(path: Path, objs: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs) + tail)


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    """3 rounds (round 2 recorded twice: the second is the redone one), events, fleet snapshots, summary."""
    run = tmp_path / "runs" / "exp-001"
    run.mkdir(parents=True)
    metrics = [{"event": "start", "preset": "small"},
               _round_record(1, loss=1.5),
               _round_record(2, loss=9.8765),              # interrupted round, later redone
               {"event": "resume", "round": 2},
               _round_record(2, loss=1.2345),
               _round_record(3, loss=0.9),
               {"event": "done"}]
    _write_jsonl(run / "metrics.jsonl", metrics, tail='{"event": "round", "round": 4, "train_')  # torn line
    events = []
    for r in (1, 2, 3):
        t = 60.0 * r
        events += [{"round": r, "sim_time_s": t - 30, "kind": "enter", "vehicle": f"v{r}", "edge": "e0"},
                   {"round": r, "sim_time_s": t - 20, "kind": "leave", "vehicle": f"v{r + 5}", "edge": "e1"},
                   {"round": r, "sim_time_s": t - 10, "kind": "handover", "vehicle": f"v{r}", "edge": "e1",
                    "detail": {"from": "e0"}}]
    events += [{"round": 2, "sim_time_s": 100.0, "kind": "departure_unpredicted", "vehicle": "v04", "edge": "e0",
                "client": "c-e0-0"},
               {"round": 2, "sim_time_s": 100.5, "kind": "recovery", "vehicle": "v04", "edge": "e0",
                "client": "c-e0-0", "detail": {"recovery_s": 1.25, "choice": "template"}},
               {"round": 2, "kind": "resume"}]                       # no sim_time_s: placed at its round's time
    _write_jsonl(run / "events.jsonl", events)
    (run / "fleet").mkdir()
    for r in (1, 2, 3):
        (run / "fleet" / f"round_{r:03d}.json").write_text(json.dumps(_fleet(r)))
    (run / "summary.json").write_text(json.dumps({
        "preset": "small", "rounds": 3, "vehicles": 50, "edges": 2, "wall_s": 42.5,
        "driver": {"RC": 61.5, "IS": 0.8, "DS": 49.2, "routes": [{"id": "r0"}, {"id": "r1"}], "source": "adm"}}))
    (run / "config.yaml").write_text("preset: small\nrounds: 3\nfleet:\n  vehicles: 50\n")
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _embedded(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_full_report_has_every_part(full_run: Path) -> None:
    path = rep.write_report(full_run)
    assert path == full_run / "report.md"
    md = path.read_text()
    for r in (1, 2, 3):
        assert re.search(rf"^\| {r} \| {60 * r} \|", md, re.M), f"round {r} missing from the per-round table"
    expected = {"learning.png", "timeline.png", "bytes.png", "wall.png",
                "fleet_r001.png", "fleet_r002.png", "fleet_r003.png"}
    assert {p.name for p in (full_run / "plots").glob("*.png")} == expected
    assert {Path(p).name for p in _embedded(md)} == expected
    for rel in _embedded(md):
        assert not Path(rel).is_absolute()
        w, h = _png_size(full_run / rel)
        assert w >= 500 and h >= 250, (rel, w, h)
        assert 5_000 < (full_run / rel).stat().st_size < 2_000_000, rel
    # driver, paper comparison, config, events
    assert "| DS | 49.20 |" in md and "| routes | 2 |" in md
    assert "This run vs the paper" in md and "92.66" in md and "§6.4" in md
    assert "60.0 % (round 1) → 80.0 % (round 3)" in md           # tl_acc first → last
    assert "1.25 s median" in md                                   # recovery_s from the recovery event
    assert "vehicles: 50" in md                                    # config.yaml listed
    assert "| recovery | 1 |" in md and "| handover | 3 |" in md
    assert "unreadable JSONL lines skipped | 1" in md             # the torn last line


def test_last_record_of_a_redone_round_wins(full_run: Path) -> None:
    records, bad = rep.read_jsonl(full_run / "metrics.jsonl")
    assert bad == 1
    rounds = rep.latest_rounds(records)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["train_loss"] == pytest.approx(1.2345)
    md = rep.write_report(full_run).read_text()
    assert "1.2345" in md and "9.8765" not in md


def test_run_without_driver_eval_events_or_fleet(tmp_path: Path) -> None:
    run = tmp_path / "r1"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [_round_record(1, loss=2.0, with_global=False)])
    (run / "summary.json").write_text(json.dumps({"preset": "tiny", "rounds": 1, "driver": None}))
    md = rep.write_report(run).read_text()
    assert "Closed-loop evaluation of the final driver: **not run**" in md
    assert re.search(r"^\| 1 \| 60 \|", md, re.M)
    assert "| traffic-light accuracy (held-out global encoder) | 79.9 % → 92.66 % | not run |" in md
    assert "| driving score DS | 30 | not run |" in md
    assert "Fleet snapshots not recorded" in md and "events.jsonl not recorded" in md
    assert "config.yaml / config.json not recorded" in md
    assert {p.name for p in (run / "plots").glob("*.png")} == {"learning.png", "bytes.png", "wall.png"}
    for p in (run / "plots").glob("*.png"):
        _png_size(p)


def test_empty_run_folder_still_reports(tmp_path: Path) -> None:
    run = tmp_path / "r0"
    run.mkdir()
    md = rep.write_report(run).read_text()
    assert "No round records: training not run." in md and "summary.json | not recorded" in md
    with pytest.raises(FileNotFoundError):
        rep.write_report(tmp_path / "missing")


def test_fleet_rounds_first_middle_last() -> None:
    assert rep.fleet_rounds_to_plot([]) == []
    assert rep.fleet_rounds_to_plot([4]) == [4]
    assert rep.fleet_rounds_to_plot([1, 2]) == [1, 2]
    assert rep.fleet_rounds_to_plot(list(range(1, 11))) == [1, 6, 10]


def test_cli_regenerates_and_has_help(full_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        rep.main(["--help"])
    assert e.value.code == 0 and "run_dir" in capsys.readouterr().out
    assert rep.main([str(full_run)]) == 0
    assert capsys.readouterr().out.strip() == str(full_run / "report.md")
    assert (full_run / "plots" / "wall.png").is_file()


def test_telemetry_round_trips_through_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = tel.Telemetry(tmp_path)
    assert t.enabled
    for r, loss in ((1, 1.5), (2, 1.25), (3, 0.75)):
        t.round(_round_record(r, loss=loss))
    t.round({"event": "round", "round": 4, "train_loss": None, "global": None})   # gaps, not zeros
    t.scalar("driver/DS", 49.5, 3)
    t.close()
    t.close()                                                      # idempotent
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()

    def values(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert values("train_loss") == [(1, 1.5), (2, 1.25), (3, 0.75)]
    assert values("global/tl_acc") == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7)), (3, pytest.approx(0.8))]
    assert values("moved_MB") == [(1, pytest.approx(7.6)), (2, pytest.approx(7.7)), (3, pytest.approx(7.8))]
    assert values("wall/training_s") == [(1, 4.0), (2, 5.0), (3, 6.0)]
    assert values("samples") == [(1, 160.0), (2, 160.0), (3, 160.0)]
    assert values("edge/e0/accepted") == [(1, 3.0), (2, 3.0), (3, 3.0)]
    assert values("edge/e1/samples") == [(1, 64.0), (2, 64.0), (3, 64.0)]
    assert values("driver/DS") == [(3, 49.5)]


def test_telemetry_without_tensorboard_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # import fails as if not installed
    monkeypatch.setattr(tel, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=tel.__name__):
        a, b = tel.Telemetry(tmp_path / "a"), tel.Telemetry(tmp_path / "b")
    assert not a.enabled and not b.enabled
    a.round(_round_record(1, loss=1.0))
    a.scalar("x", 1.0, 0)
    a.close()
    assert len([r for r in caplog.records if "TensorBoard" in r.message]) == 1
    assert not (tmp_path / "a" / "tb").exists()
