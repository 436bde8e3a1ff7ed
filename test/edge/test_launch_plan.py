"""Launch plans (flad_vehicle.launch, flad_edge.launch): what each launch file starts, checked against the
real packages.

`launch`/`launch_ros` are not installable here, so the .launch.py files are thin and everything they decide
is tested through the plan: executables exist as console scripts and modules, parameters are fields of the
node's config dataclass and pass its validation, the CARLA spawn file matches flad_sim's rig.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import types
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import yaml

from flad_core.config import ConfigError, from_dict
from flad_core.fleet import load_fleet
from flad_edge.launch import carla, plans
from flad_edge.nodes.cloud import CloudNodeConfig
from flad_edge.nodes.orchestrator import OrchestratorNodeConfig
from flad_vehicle.launch import ros
from flad_vehicle.launch import spec as ls
from flad_vehicle.nodes.stage_worker import StageWorkerNodeConfig, with_edge_host

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
FLEET = load_fleet(LAUNCH / "fleet.yaml")

ALL_PLANS = [
    ("vehicle", {"vehicle_id": "v001"}),
    ("edge", {}),
    ("cloud", {}),
    ("fleet", {"vehicles": "3", "rounds": "1"}),
    ("closed_loop_embedded", {"vehicles": "2"}),
    ("closed_loop_embedded", {"waypoint_source": "encoder_head", "duration_s": "30"}),
    ("closed_loop_embedded", {"waypoint_source": "expert"}),
    ("closed_loop_carla", {}),
]


def _setup_py(package: str) -> dict[str, Any]:
    """console_scripts and LAUNCH_PATTERNS of src/<package>/setup.py, read without running it."""
    tree = ast.parse((REPO / "src" / package / "setup.py").read_text())
    out: dict[str, Any] = {"scripts": {}, "patterns": []}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "LAUNCH_PATTERNS" for t in node.targets):
            out["patterns"] = ast.literal_eval(node.value)
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == "console_scripts":
                    for line in ast.literal_eval(v):
                        name, target = (s.strip() for s in line.split("=", 1))
                        out["scripts"][name] = target
    return out


def _leaf_fields(cls: type, prefix: str = "") -> set[str]:
    hints = get_type_hints(cls)
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            names |= _leaf_fields(hint, f"{prefix}{f.name}.")
        else:
            names.add(f"{prefix}{f.name}")
    return names


def _config_class(kind: ls.NodeKind) -> type:
    module, _, name = kind.config.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("plan_name", "args"), ALL_PLANS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(ALL_PLANS)])
def test_every_planned_node_exists_and_its_parameters_fit_its_config(plan_name: str, args: dict[str, str],
                                                                    tmp_path: Path) -> None:
    plan = plans.make_plan(plan_name, {**args, "run_dir": str(tmp_path)})
    assert plan.nodes
    fqns = [n.fqn for n in plan.nodes]
    assert len(set(fqns)) == len(fqns), f"two nodes share a name: {fqns}"
    for spec in plan.nodes:
        kind = spec.kind
        scripts = _setup_py(kind.package)["scripts"]
        assert scripts.get(spec.executable) == f"{kind.module}:main", (
            f"{spec.executable} is not a console_script of {kind.package} pointing at {kind.module}:main")
        assert importlib.util.find_spec(kind.module) is not None, f"no module {kind.module}"
        assert callable(importlib.import_module(kind.module).main)
        cls = _config_class(kind)
        params = spec.flat_parameters()
        unknown = set(params) - _leaf_fields(cls)
        assert not unknown, f"{spec.fqn}: {sorted(unknown)} are not fields of {cls.__name__}"
        from_dict(cls, spec.parameters, key=spec.name)   # the node would accept these values


def test_vehicle_plan_namespaces_a_vehicle_and_passes_its_arguments() -> None:
    plan = plans.make_plan("vehicle", {"vehicle_id": "v002", "role_name": "hero", "edge_address": "edge.example",
                                    "fleet": str(LAUNCH / "fleet.yaml")})
    assert [(n.executable, n.fqn) for n in plan.nodes] == [
        ("stage_worker_node", "/v002/stage_worker"), ("encoder_node", "/v002/encoder"),
        ("controller_node", "/v002/controller")]
    worker, encoder, controller = plan.nodes
    assert worker.parameters["vehicle_id"] == "v002"
    assert worker.parameters["edge_address"] == "edge.example"
    assert worker.parameters["fleet"] == str(LAUNCH / "fleet.yaml")
    assert encoder.parameters == {"vehicle_id": "v002", "role_name": "hero"}
    assert controller.parameters == {"vehicle_id": "v002", "role_name": "hero"}
    # without a role name, the ego is named after the vehicle
    assert plans.make_plan("vehicle", {"vehicle_id": "v002"}).nodes[1].parameters["role_name"] == "v002"


def test_plans_default_to_the_repositorys_fleet_file() -> None:
    assert ls.repo_launch_dir() == LAUNCH
    assert ls.load_plan_fleet(ls.PlanArgs()) == FLEET


def test_fleet_plan_is_the_demo_over_ros() -> None:
    plan = plans.make_plan("fleet", {"vehicles": "2", "rounds": "1", "port_base": "9100"})
    by_exec = [n.executable for n in plan.nodes]
    assert by_exec == ["cloud_node", "orchestrator_node", "stage_worker_node", "stage_worker_node"]
    orch = plan.nodes[1].parameters
    assert orch["cloud"] is True and orch["rounds"] == 1 and orch["expect"] == 2 and orch["port_base"] == 9100
    assert [n.parameters["vehicle_id"] for n in plan.nodes[2:]] == [v.id for v in FLEET.vehicles[:2]]
    cp = plans.make_plan("fleet", {"mode": "control_plane"})
    assert [n.executable for n in cp.nodes].count("stage_worker_node") == len(FLEET.vehicles)
    assert "cloud_node" not in [n.executable for n in cp.nodes]     # no weights to aggregate
    assert all(n.parameters["mode"] == "control_plane" for n in cp.nodes)


def test_closed_loop_embedded_drives_n_vehicles_with_the_edge_serving() -> None:
    plan = plans.make_plan("closed_loop_embedded", {"vehicles": "2", "town": "Town02"})
    world = plan.nodes[0]
    assert world.executable == "world_bridge"
    ids = [v.id for v in FLEET.vehicles[:2]]
    assert world.parameters["roles"] == ids and world.parameters["town"] == "Town02"
    for vid in ids:
        assert {n.executable for n in plan.nodes if n.namespace == vid} == {
            "stage_worker_node", "encoder_node", "controller_node"}
    orch = next(n for n in plan.nodes if n.executable == "orchestrator_node")
    assert orch.parameters["mode"] == "control_plane" and orch.parameters["duration_s"] == 0.0
    wp = next(n for n in plan.nodes if n.executable == "waypoint_node")
    assert wp.parameters["vehicle_ids"] == ids
    assert "duration_s" not in world.parameters          # default: drive until every route has ended
    assert all("waypoint_source" not in n.parameters for n in plan.nodes)   # default: the edge's waypoints
    with pytest.raises(ConfigError, match="vehicles"):
        plans.make_plan("closed_loop_embedded", {"vehicles": str(len(FLEET.vehicles) + 1)})
    expert = plans.make_plan("closed_loop_embedded", {"waypoint_source": "expert", "duration_s": "30"})
    assert expert.nodes[0].parameters["duration_s"] == 30.0
    by_exec = {n.executable: n.parameters for n in expert.nodes}
    assert by_exec["controller_node"]["waypoint_source"] == "expert"
    assert "waypoint_source" not in by_exec["encoder_node"]
    head = plans.make_plan("closed_loop_embedded", {"waypoint_source": "encoder_head"})
    by_exec = {n.executable: n.parameters for n in head.nodes}
    assert by_exec["controller_node"]["waypoint_source"] == by_exec["encoder_node"]["waypoint_source"] == (
        "encoder_head")


def test_closed_loop_carla_includes_the_bridge_synchronously(tmp_path: Path) -> None:
    plan = plans.make_plan("closed_loop_carla", {"carla_host": "carla", "carla_port": "2010", "run_dir": str(tmp_path)})
    bridge, spawn = plan.includes
    assert (bridge.package, bridge.launch_file) == ("carla_ros_bridge", "carla_ros_bridge.launch.py")
    assert bridge.arguments["synchronous_mode"] == "True"
    assert bridge.arguments["fixed_delta_seconds"] == "0.05"
    assert bridge.arguments["host"] == "carla" and bridge.arguments["port"] == "2010"
    assert (spawn.package, spawn.arguments["objects_definition_file"]) == (
        "carla_spawn_objects", str(tmp_path / "flad_objects_hero.json"))
    assert json.loads(plan.files[spawn.arguments["objects_definition_file"]]) == carla.carla_objects("hero")
    assert {n.parameters.get("role_name") for n in plan.nodes if n.namespace} - {None} == {"hero"}


def test_carla_spawn_objects_match_flad_sims_rig() -> None:
    """Checked against carla_adapter.rig_sensor_specs (CARLA frame: y right, yaw clockwise) independently."""
    from flad_sim.carla_adapter import rig_sensor_specs
    from flad_sim.sensors import RigConfig

    rig = RigConfig()
    (ego,) = carla.carla_objects("hero")["objects"]
    assert ego["id"] == "hero" and ego["type"].startswith("vehicle.")
    sensors = {s["id"]: s for s in ego["sensors"]}
    specs = {s.name: s for s in rig_sensor_specs(rig)}
    for cam in rig.cameras:
        s, spec = sensors[cam.name], specs[cam.name]
        assert s["type"] == "sensor.camera.rgb"
        assert (s["image_size_x"], s["image_size_y"]) == (cam.width, cam.height)
        assert str(s["image_size_x"]) == spec.attributes["image_size_x"]
        assert s["fov"] == pytest.approx(cam.fov_deg)
        sp = s["spawn_point"]   # ROS frame (y left, yaw CCW): the mirror of CARLA's
        assert (sp["x"], -sp["y"], sp["z"]) == pytest.approx((spec.x, spec.y, spec.z))
        assert -sp["yaw"] == pytest.approx(spec.yaw)
    assert {"rgb_front", "rgb_left", "rgb_right", "rgb_rear"} <= set(sensors)
    lidar, spec = sensors["lidar"], specs["lidar"]
    assert lidar["type"] == "sensor.lidar.ray_cast" and lidar["channels"] == rig.lidar.channels == 32
    for key in ("range", "upper_fov", "lower_fov", "rotation_frequency", "points_per_second"):
        assert float(lidar[key]) == pytest.approx(float(spec.attributes[key])), key
    assert sensors["gnss"]["type"] == "sensor.other.gnss"
    assert sensors["speedometer"]["type"] == "sensor.pseudo.speedometer"
    assert sensors["odometry"]["type"] == "sensor.pseudo.odom"
    assert sensors["control"]["type"] == "sensor.pseudo.control"


def test_checked_in_carla_objects_file_is_current() -> None:
    text = (LAUNCH / "carla_objects.json").read_text()
    assert text == carla.carla_objects_json("hero"), (
        "launch/carla_objects.json is stale; regenerate: python -c \"from flad_edge.launch.carla import "
        "carla_objects_json; open('launch/carla_objects.json', 'w').write(carla_objects_json('hero'))\"")


def test_bad_launch_arguments_are_named() -> None:
    with pytest.raises(ConfigError, match=r"launch\.vehicles"):
        plans.make_plan("fleet", {"vehicles": "-1"})
    with pytest.raises(ConfigError, match="vehicle_id"):
        plans.make_plan("vehicle", {})
    with pytest.raises(KeyError, match="v999"):
        plans.make_plan("vehicle", {"vehicle_id": "v999"})
    with pytest.raises(ConfigError, match="edge_address"):
        plans.make_plan("vehicle", {"vehicle_id": "v000", "edge_address": "tcp://edge:7110"})
    with pytest.raises(ConfigError, match="plan"):
        plans.make_plan("nope")
    with pytest.raises(ConfigError, match="mode"):
        plans.make_plan("edge", {"mode": "train"})
    with pytest.raises(ConfigError, match="colour"):
        plans.make_plan("edge", {"colour": "red"})


def test_params_file_and_ros_args_address_the_node() -> None:
    spec = ls.NodeSpec("controller_node", "controller", "v001", {"vehicle_id": "v001", "pid": {"turn_kp": 1.5}},
                       remappings=[("/a", "/b")])
    data = yaml.safe_load(ros.params_yaml(spec))
    assert data == {"/v001/controller": {"ros__parameters": {"vehicle_id": "v001", "pid": {"turn_kp": 1.5}}}}
    assert spec.flat_parameters() == {"vehicle_id": "v001", "pid.turn_kp": 1.5}
    args = ros.ros_args(spec, Path("/tmp/p.yaml"))
    assert args == ["--ros-args", "-r", "__node:=controller", "-r", "__ns:=/v001", "-r", "/a:=/b",
                    "--params-file", "/tmp/p.yaml"]
    assert ros.node_command(spec, None)[1:3] == ["-m", "flad_vehicle.nodes.controller_node"]


def test_edge_address_moves_only_the_edges_endpoints() -> None:
    moved = with_edge_host(FLEET, "10.1.2.3")
    assert moved.bus.hub_pub == FLEET.bus.hub_pub.replace("127.0.0.1", "10.1.2.3")
    assert moved.bus.hub_sub == FLEET.bus.hub_sub.replace("127.0.0.1", "10.1.2.3")
    for name, address in moved.bus.services.items():
        original = FLEET.bus.services[name]
        if name.startswith("edge/"):
            assert address == original.replace("127.0.0.1", "10.1.2.3"), name
        else:
            assert address == original, f"{name} is not the edge's and must not move"
    assert any(not n.startswith("edge/") for n in moved.bus.services)
    assert moved.vehicles == FLEET.vehicles


def test_node_configs_reject_bad_values_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"orchestrator\.rounds"):
        from_dict(OrchestratorNodeConfig, {"rounds": -1}, key="orchestrator")
    with pytest.raises(ConfigError, match=r"orchestrator\.fhdp_config"):
        from_dict(OrchestratorNodeConfig, {"fhdp_config": str(tmp_path / "missing.yaml")}, key="orchestrator")
    with pytest.raises(ConfigError, match=r"stage_worker\.vehicle_id"):
        from_dict(StageWorkerNodeConfig, {"vehicle_id": "9lives"}, key="stage_worker")
    with pytest.raises(ConfigError, match=r"stage_worker\.vehicle_id"):
        from_dict(StageWorkerNodeConfig, {}, key="stage_worker")          # required
    with pytest.raises(ConfigError, match=r"stage_worker\.register_timeout_s"):
        from_dict(StageWorkerNodeConfig, {"vehicle_id": "v0", "register_timeout_s": 0}, key="stage_worker")
    with pytest.raises(ConfigError, match=r"cloud\.deadline_s"):
        from_dict(CloudNodeConfig, {"deadline_s": 0}, key="cloud")
    assert from_dict(CloudNodeConfig, {"edges": "e1, e2"}).edge_ids("x") == ["e1", "e2"]
    assert from_dict(CloudNodeConfig, {}).edge_ids("edge-0") == ["edge-0"]


def test_every_config_field_has_a_description() -> None:
    for cls in (OrchestratorNodeConfig, CloudNodeConfig, StageWorkerNodeConfig, ls.PlanArgs):
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
        assert not missing, f"{cls.__name__}: {missing} have no help text (the ROS parameter description)"


def test_launch_files_compile_are_installed_and_name_a_plan() -> None:
    files = sorted(LAUNCH.glob("*.launch.py"))
    assert {f.name for f in files} >= {"vehicle.launch.py", "edge.launch.py", "cloud.launch.py",
                                       "closed_loop_embedded.launch.py", "closed_loop_carla.launch.py"}
    patterns = {pkg: _setup_py(pkg)["patterns"] for pkg in ("flad_sim", "flad_vehicle", "flad_edge")}
    for f in files:
        tree = compile(f.read_text(), str(f), "exec", ast.PyCF_ONLY_AST)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                 "launch_description"]
        assert len(calls) == 1 and calls[0].args[0].value in plans.PLANS, f.name
        assert any(fnmatch(f.name, pat) for pats in patterns.values() for pat in pats), (
            f"{f.name} is installed by no package's setup.py LAUNCH_PATTERNS")


def test_generate_launch_description_where_launch_ros_exists() -> None:
    pytest.importorskip("launch_ros", reason="launch_ros is not installable here (no wheels): "
                                             "generate_launch_description() is only exercised where ROS 2 is installed")
    for f in sorted(LAUNCH.glob("*.launch.py")):
        spec = importlib.util.spec_from_file_location(f.stem.replace(".", "_"), f)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.generate_launch_description().entities


def _package_closure(package: str) -> set[str]:
    """`package` and the FLAD packages it depends on through src/*/package.xml's <exec_depend>, transitively."""
    out, todo = set(), [package]
    while todo:
        pkg = todo.pop()
        if pkg in out:
            continue
        out.add(pkg)
        xml = (REPO / "src" / pkg / "package.xml").read_text()
        todo += [d for d in re.findall(r"<exec_depend>(flad_\w+)</exec_depend>", xml) if d != "flad_msgs"]
    return out


def _flad_imports(tree: ast.AST) -> set[str]:
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {m for m in names if m.startswith("flad_")}


@pytest.mark.parametrize("launch_file", sorted(f.name for f in LAUNCH.glob("*.launch.py")))
def test_launch_files_import_only_what_their_package_xml_declares(launch_file: str) -> None:
    """A launch file runs from its package's share/ folder: every FLAD module it loads, directly or through
    its imports, must come from that package or one its package.xml depends on (vehicle.launch.py: no edge)."""
    f = LAUNCH / launch_file
    (package,) = [pkg for pkg in ("flad_sim", "flad_vehicle", "flad_edge")
                  if any(fnmatch(f.name, pat) for pat in _setup_py(pkg)["patterns"])]
    allowed = _package_closure(package)
    tree = ast.parse(f.read_text())
    modules = _flad_imports(tree)
    assert modules and {m.split(".")[0] for m in modules} <= allowed, (f.name, sorted(modules), sorted(allowed))
    plans_module = next(n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and any(a.name == "PLANS" for a in n.names))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                "launch_description")
    assert call.args[0].value in importlib.import_module(plans_module).PLANS, f.name
    probe = ("import importlib, sys\n"
             f"for m in {sorted(modules)!r}: importlib.import_module(m)\n"
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules if m.startswith('flad_')})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) <= allowed, f"{f.name} loads {out.stdout.split()}; {package} declares {allowed}"


def _stub_launch_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Just enough of launch / launch_ros / ament_index_python for `launch_description` and `plan_actions`."""
    class Action:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.args, self.kwargs = args, kwargs

    modules = {
        "launch": {"LaunchDescription": type("LaunchDescription", (Action,), {})},
        "launch.actions": {name: type(name, (Action,), {}) for name in (
            "DeclareLaunchArgument", "OpaqueFunction", "IncludeLaunchDescription")},
        "launch.launch_description_sources": {"PythonLaunchDescriptionSource": type("Source", (Action,), {})},
        "launch_ros": {},
        "launch_ros.actions": {"Node": type("Node", (Action,), {})},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda pkg: f"/opt/share/{pkg}"},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


def test_launch_files_build_their_plan_with_stub_launch_ros(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where launch_ros is missing (here), each launch file still runs against a stand-in: it declares every
    PlanArgs field and, at launch time, builds the Nodes and includes of the plan it names."""
    if importlib.util.find_spec("launch_ros") is not None:
        pytest.skip("the real launch_ros is installed: test_generate_launch_description_where_launch_ros_exists")
    _stub_launch_packages(monkeypatch)
    for f in sorted(LAUNCH.glob("*.launch.py")):
        module_spec = importlib.util.spec_from_file_location(f.stem.replace(".", "_"), f)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        *declared, opaque = module.generate_launch_description().args[0]
        assert [d.args[0] for d in declared] == [fld.name for fld in dataclasses.fields(ls.PlanArgs)], f.name
        defaults = {d.args[0]: d.kwargs["default_value"] for d in declared}
        assert defaults["fleet"] == str(LAUNCH / "fleet.yaml")   # the launch file's own folder
        name = f.name.removesuffix(".launch.py")
        values = {**defaults, "vehicle_id": "v001", "run_dir": str(tmp_path)}
        context = types.SimpleNamespace(launch_configurations=values)
        actions = opaque.kwargs["function"](context)
        plan = plans.make_plan(name, values)
        nodes = [a for a in actions if type(a).__name__ == "Node"]
        assert [(n.kwargs["executable"], n.kwargs["namespace"], n.kwargs["name"]) for n in nodes] == [
            (s.executable, s.namespace, s.name) for s in plan.nodes], f.name
        assert len(actions) - len(nodes) == len(plan.includes), f.name
        for path in plan.files:
            assert Path(path).is_file(), f"{f.name}: {path} not written"


def test_flad_launch_cli_dry_run_and_errors(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "flad_core.cli", "launch", "fleet", "vehicles:=2", "--dry-run",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all(" -m flad_" in ln and "--ros-args" in ln for ln in lines)
    params = yaml.safe_load((tmp_path / "params_v000_stage_worker.yaml").read_text())
    assert params["/v000/stage_worker"]["ros__parameters"]["vehicle_id"] == "v000"
    bad = subprocess.run([sys.executable, "-m", "flad_core.cli", "launch", "fleet", "rounds:=-2", "--dry-run",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "launch.rounds" in bad.stderr
    carla = subprocess.run([sys.executable, "-m", "flad_core.cli", "launch", "closed_loop_carla",
                            "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert carla.returncode == 2 and "carla_ros_bridge" in carla.stderr


def _flad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from flad_core.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [
    ["launch", "vehicle", "--dry-run", "vehicle_id:=v001"],                   # after an option (was refused)
    ["launch", "vehicle", "vehicle_id:=v001", "--dry-run"],
    ["launch", "--dry-run", "vehicle", "vehicle_id:=v001"],
    ["launch", "vehicle", "role_name:=ego", "--dry-run", "vehicle_id:=v001"],  # both sides of an option
])
def test_flad_launch_takes_launch_arguments_anywhere(argv: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _flad([*argv, "--run-dir", str(tmp_path)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines and all("__ns:=/v001" in ln for ln in lines), out
    params = yaml.safe_load((tmp_path / "params_v001_stage_worker.yaml").read_text())
    assert params["/v001/stage_worker"]["ros__parameters"]["vehicle_id"] == "v001"


def test_flad_launch_later_launch_argument_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _flad(["launch", "fleet", "rounds:=2", "--dry-run", "rounds:=-2", "--run-dir", str(tmp_path)],
                         capsys)
    assert code == 2 and "launch.rounds" in err


@pytest.mark.parametrize("extra", [["--bogus"], ["stray"], ["--bogus=1"]])
def test_flad_launch_refuses_what_is_neither_option_nor_launch_argument(
        extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _flad(["launch", "vehicle", "--dry-run", *extra, "vehicle_id:=v001", "--run-dir",
                            str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("flad launch: unrecognized argument") and extra[0] in err
    assert "NAME:=VALUE" in err
    assert not list(tmp_path.iterdir())            # refused before anything was written


@pytest.mark.parametrize("name", ["data", "fhdp_config"])
def test_flad_launch_dry_run_checks_path_arguments(name: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-thing"
    code, out, err = _flad(["launch", "fleet", "--dry-run", f"{name}:={missing}", "--run-dir", str(run_dir)], capsys)
    assert code == 2 and out == "" and not run_dir.exists()
    assert err.count("\n") == 1 and f"{name}:={missing}" in err and "no such file" in err
    present = tmp_path / ("fleet-data" if name == "data" else "fhdp.yaml")
    if name == "data":
        present.mkdir()
    else:
        present.write_text((LAUNCH / "fhdp.yaml").read_text())
    code, out, err = _flad(["launch", "fleet", "--dry-run", f"{name}:={present}", "--run-dir", str(run_dir)], capsys)
    assert code == 0, err
    assert str(present) in "".join(p.read_text() for p in run_dir.glob("params_*.yaml"))


def test_flad_launch_dry_run_takes_the_path_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _flad(["launch", "fleet", "--dry-run", "data:=synthetic", "fhdp_config:=", "--run-dir",
                          str(tmp_path)], capsys)
    assert code == 0, err
