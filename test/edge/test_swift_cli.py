"""`flad edge plan` / `flad edge templates`: JSON in and out, run as the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_core.config import ConfigError, to_dict
from flad_edge.swift import validate_plan
from flad_edge.swift.model import Cluster, Layer, Profile, Vehicle, load_cluster, load_profile, synthetic_profile

GB = 1e9


def _flad(*args: str, env_dir=None, subprocess_run: bool = True) -> subprocess.CompletedProcess:
    """Run `flad ...`: as the real command in a subprocess, or in-process through the same entry point."""
    if not subprocess_run:
        return _flad_inprocess(args, env_dir)
    env = dict(os.environ)
    if env_dir is not None:
        env["FLAD_SWIFT_POLICY_DIR"] = str(env_dir)
    return subprocess.run([sys.executable, "-m", "flad_core.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _flad_inprocess(args, env_dir) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from flad_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    mp = pytest.MonkeyPatch()
    if env_dir is not None:
        mp.setenv("FLAD_SWIFT_POLICY_DIR", str(env_dir))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as exc:  # argparse errors
                rc = int(exc.code or 0)
    finally:
        mp.undo()
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


@pytest.fixture()
def files(tmp_path):
    cluster = {"vehicles": [
        {"id": "nano1", "mem_bytes": 4 * GB, "tflops": 0.472, "link_mbps": 20, "stability": 0.9},
        {"id": "nx1", "mem_bytes": 4 * GB, "tflops": 0.404, "link_mbps": 50, "stability": 0.5},
        {"id": "agx1", "mem_bytes": 16 * GB, "tflops": 3.85, "link_mbps": 100, "stability": 0.2}],
        "mu": 0.5, "nu": 1.3, "n_batch": 100}
    profile = {"layers": [to_dict(la) for la in synthetic_profile(11.10, n_layers=16, seed=0).layers]}
    c, p = tmp_path / "cluster.json", tmp_path / "profile.json"
    c.write_text(json.dumps(cluster))
    p.write_text(json.dumps(profile))
    return tmp_path, cluster, profile


def test_plan_valid_run(files, swift_policy_dir):
    d, cluster, profile = files
    outs = {}
    for method in ("exact", "swift", "greedy", "dqn"):
        r = _flad("edge", "plan", "--cluster", str(d / "cluster.json"), "--profile", str(d / "profile.json"),
                  "--method", method, "--first", "nx1", "--json", env_dir=swift_policy_dir,
                  subprocess_run=method in ("exact", "swift"))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert set(out) >= {"method", "path", "layers", "t_path_s", "bottleneck_s", "feasible", "reason",
                            "plan_time_s"}
        assert out["method"] == method and out["feasible"] and out["path"][0] == "nx1"
        ranges = [tuple(out["layers"][v]) for v in out["path"]]
        cl, pr = load_cluster(cluster), load_profile(profile)
        assert validate_plan(out["path"], ranges, cl, pr, first="nx1") == []
        outs[method] = out
    assert outs["swift"]["t_path_s"] == pytest.approx(outs["exact"]["t_path_s"], rel=0.02)
    assert outs["exact"]["t_path_s"] <= outs["greedy"]["t_path_s"]


def test_plan_infeasible_is_an_answer(files):
    d, cluster, _ = files
    for v in cluster["vehicles"]:
        v["mem_bytes"] = 1 * GB
    (d / "small.json").write_text(json.dumps(cluster))
    r = _flad("edge", "plan", "--cluster", str(d / "small.json"), "--profile", str(d / "profile.json"),
              "--method", "exact", "--objective", "bottleneck", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["feasible"] is False and "memory" in out["reason"]


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda c, p: c["vehicles"][1].update(tflops="fast"), "vehicles[1].tflops"),
    (lambda c, p: c["vehicles"][0].pop("mem_bytes"), "vehicles[0].mem_bytes"),
    (lambda c, p: c.update(colour="red"), "colour"),
    (lambda c, p: c["vehicles"][2].update(id="nano1"), "duplicate vehicle id"),
    (lambda c, p: c.update(mu=0), "mu"),
    (lambda c, p: p["layers"][3].update(flops=-1), "layers[3].flops"),
    (lambda c, p: p["layers"][0].pop("activation_bytes"), "layers[0].activation_bytes"),
])
def test_plan_malformed_input_exits_2_naming_the_problem(files, mutate, needle):
    d, cluster, profile = files
    mutate(cluster, profile)
    (d / "c2.json").write_text(json.dumps(cluster))
    (d / "p2.json").write_text(json.dumps(profile))
    r = _flad("edge", "plan", "--cluster", str(d / "c2.json"), "--profile", str(d / "p2.json"), "--method",
              "greedy", "--json", subprocess_run=needle == "vehicles[1].tflops")
    assert r.returncode == 2
    assert needle in r.stderr and r.stdout == ""


def test_plan_bad_files_and_arguments_exit_2(files):
    d, _, _ = files
    (d / "broken.json").write_text("{\"vehicles\": [")
    r = _flad("edge", "plan", "--cluster", str(d / "broken.json"), "--profile", str(d / "profile.json"), "--json")
    assert r.returncode == 2 and "invalid JSON" in r.stderr and "broken.json" in r.stderr
    r = _flad("edge", "plan", "--cluster", str(d / "missing.json"), "--profile", str(d / "profile.json"),
              subprocess_run=False)
    assert r.returncode == 2 and "missing.json" in r.stderr
    r = _flad("edge", "plan", "--cluster", str(d / "cluster.json"), "--profile", str(d / "profile.json"),
              "--method", "greedy", "--first", "ghost", subprocess_run=False)
    assert r.returncode == 2 and "ghost" in r.stderr
    r = _flad("edge", "plan", "--cluster", str(d / "cluster.json"), "--profile", str(d / "profile.json"),
              "--method", "annealing", subprocess_run=False)
    assert r.returncode == 2 and "annealing" in r.stderr


def test_templates_command(files, swift_policy_dir):
    d, _, _ = files
    r = _flad("edge", "templates", "--cluster", str(d / "cluster.json"), "--profile", str(d / "profile.json"),
              "--out", str(d / "tpl.json"), "--json", env_dir=swift_policy_dir, subprocess_run=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_templates"] == 3 and json.loads((d / "tpl.json").read_text()) == out
    assert sorted(tuple(t["surviving"]) for t in out["templates"]) == [("agx1", "nano1"), ("agx1", "nx1"),
                                                                       ("nano1", "nx1")]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
                     lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                     max_leaves=12)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=_json)
def test_parsers_reject_garbage_with_config_errors(data):
    for loader in (load_cluster, load_profile):
        try:
            loader(data)
        except ConfigError as exc:
            assert str(exc)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(mem=st.floats(allow_nan=True, allow_infinity=True), tflops=st.floats(allow_nan=True, allow_infinity=True),
       vid=st.one_of(st.integers(), st.text(min_size=1, max_size=4)))
def test_cluster_parser_checks_numbers(mem, tflops, vid):
    data = {"vehicles": [{"id": vid, "mem_bytes": mem, "tflops": tflops, "link_mbps": 20}]}
    try:
        cl = load_cluster(data)
    except ConfigError as exc:
        assert "mem_bytes" in str(exc) or "tflops" in str(exc)
    else:
        assert isinstance(cl, Cluster) and cl.vehicles[0].mem_bytes > 0 and cl.vehicles[0].tflops > 0
        assert cl.vehicles[0] == Vehicle(vid, mem, tflops, 20.0)


def test_profile_keeps_extra_top_level_keys_as_meta():
    p = load_profile({"config": "tiny", "layers": [{"name": "a", "flops": 1, "param_bytes": 2,
                                                    "activation_bytes": 3, "mem_bytes": 4}]})
    assert p.meta == {"config": "tiny"} and p.layers == [Layer("a", 1.0, 2.0, 3.0, 4.0)]
    assert isinstance(p, Profile)


def test_corrupt_default_policy_is_one_line_and_left_alone(files, tmp_path):
    d, _, _ = files
    pol_dir = tmp_path / "policies"
    pol_dir.mkdir()
    torn = pol_dir / "dqn_path.safetensors"
    torn.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")          # a torn header: not a policy
    for cmd in ("plan", "templates"):
        r = _flad("edge", cmd, "--cluster", str(d / "cluster.json"), "--profile", str(d / "profile.json"),
                  "--method", "swift", env_dir=pol_dir, subprocess_run=cmd == "plan")
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"flad edge {cmd}: {torn}: not a usable DQN policy")
        assert torn.read_bytes() == b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":"
