"""The embedded world as a synchronous carla-ros-bridge: one or more egos, driven by control topics, scored.

`ClosedLoopWorld` is the transport-agnostic logic of the `world_bridge` node (flad_sim/nodes/world_bridge.py):
it runs on any `flad_core.bus.Bus` (ZeroMQ or rclpy topics), so the same closed loop runs with or without ROS.

Synchronous mode, as CARLA's ROS bridge does it (`synchronous_mode_wait_for_vehicle_control_command`): each
tick publishes the frame, then waits (up to `tick_timeout_s` of wall time) until every driving ego has sent a
control stamped with that frame's time before the world steps 0.05 s. A tick whose control does not come in
time steps with the ego's last control (counted in `missed_ticks`, logged). The first frame is re-published
until every ego answered (`startup_timeout_s`): publishers and subscribers find each other asynchronously on
both transports, and models load at their own pace.

Topics per ego (role name R), besides those of `flad_sim.bridge.WorldBridge`:
  /clock                        rosgraph_msgs/Clock                 each tick (simulated time)
  /carla/R/odometry, speedometer                                    each tick
  /carla/R/rgb_*/image, lidar, gnss                                 every `sensors_every` ticks (0: never)
  /carla/R/navigation           flad_msgs/Navigation                with the sensors (each tick when sensors are off)
  /carla/R/expert_waypoints     nav_msgs/Path                       each tick when `expert_waypoints` (privileged)
  /carla/R/infraction           flad_msgs/Infraction                when one happens
  /carla/R/driving_score        flad_msgs/DrivingScore              every `score_every_s` and at the end (final)
  obeys /carla/R/vehicle_control_cmd  carla_msgs/CarlaEgoVehicleControl
Every message of one frame carries the same header stamp (the simulated time), which is how the vehicle
nodes match sensors, odometry and waypoints of one frame, and how the bridge knows a control is for this tick.

The expert waypoints come from the privileged expert (`flad_sim.expert.ExpertAgent`) run on the ego without
driving it: its pure-pursuit route position and its IDM acceleration give where it would be 0.5 .. 2.5 s from
now, along the route centre line (`ExpertPlanner`). They let the plumbing (bridge -> PID controller -> bridge)
be checked without any learned model: a PID following them should score close to the expert.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flad_core.config import ConfigError, load_yaml
from flad_sim import bridge as B
from flad_sim.agent import RouteInfo
from flad_sim.expert import ExpertAgent
from flad_sim.labels import LabelMaker, to_ego_frame
from flad_sim.metrics import STATUS_RUNNING, RouteScorer
from flad_sim.physics import DT, Control
from flad_sim.route import seeded_routes
from flad_sim.schema import N_WAYPOINTS, WAYPOINT_DT_S
from flad_sim.sensors import RigConfig, SensorRig
from flad_sim.towns import town_config
from flad_sim.world import World

log = logging.getLogger(__name__)

STATUS_STOPPED = "stopped"   # the run ended (duration_s) while the route was still running


@dataclass
class WorldBridgeConfig:
    """Parameters of the world bridge (ROS parameters of the `world_bridge` node, one per field)."""

    town: str = field(default="Town01", metadata={"help": "embedded town name (Town01 .. Town05)"})
    seed: int = field(default=0, metadata={"help": "seed of the world (traffic) and of the routes"})
    roles: list[str] = field(default_factory=lambda: ["hero"],
                             metadata={"help": "role names of the egos; one seeded route each"})
    route_length_m: float = field(default=200.0, metadata={
        "help": "minimum route length in metres (routes are drawn between this and 1.25x it)"})
    duration_s: float = field(default=0.0, metadata={
        "help": "stop after this many simulated seconds (0: when every route has ended)"})
    rig: str = field(default="default", metadata={
        "help": "sensor rig: 'default' (LMDrive's rig, scaled: 4 cameras + LiDAR) or a YAML file of "
                "flad_sim.sensors.RigConfig fields"})
    sensors_every: int = field(default=1, metadata={
        "help": "publish cameras/LiDAR/GNSS every N ticks (20 Hz ticks); 0: no sensors"})
    synchronous: bool = field(default=True, metadata={
        "help": "wait for each ego's control of a tick before stepping (CARLA synchronous mode)"})
    tick_timeout_s: float = field(default=5.0, metadata={
        "help": "synchronous mode: wall seconds to wait for a tick's controls before stepping without them"})
    startup_timeout_s: float = field(default=120.0, metadata={
        "help": "wall seconds to wait for the first control of every ego (nodes starting, models loading)"})
    real_time_factor: float = field(default=1.0, metadata={
        "help": "asynchronous mode: simulated/wall time ratio (0: as fast as possible)"})
    expert_waypoints: bool = field(default=True, metadata={
        "help": "publish the privileged expert's waypoints on /carla/<role>/expert_waypoints"})
    score_every_s: float = field(default=1.0, metadata={
        "help": "publish the running DrivingScore every this many simulated seconds"})
    result_path: str = field(default="", metadata={
        "help": "write the final scores as JSON to this file (atomic; empty: do not write)"})
    n_vehicles: int = field(default=-1, metadata={"help": "NPC vehicles (-1: the town's default density)"})
    n_pedestrians: int = field(default=-1, metadata={"help": "pedestrians (-1: the town's default density)"})

    def validate(self) -> None:
        try:
            town_config(self.town)
        except KeyError as exc:
            raise ConfigError("town", str(exc).strip("'\"")) from exc
        if not self.roles or any(not r or not r.replace("_", "").isalnum() for r in self.roles):
            raise ConfigError("roles", f"need one or more role names of letters, digits and _, got {self.roles}")
        if len(set(self.roles)) != len(self.roles):
            raise ConfigError("roles", f"role names must be unique, got {self.roles}")
        for name in ("route_length_m", "tick_timeout_s", "startup_timeout_s", "score_every_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("duration_s", "real_time_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.sensors_every < 0:
            raise ConfigError("sensors_every", f"must be >= 0, got {self.sensors_every}")
        if self.rig != "default" and not Path(self.rig).is_file():
            raise ConfigError("rig", f"'default' or a RigConfig YAML file; no file {self.rig!r}")

    def rig_config(self) -> RigConfig:
        return RigConfig() if self.rig == "default" else load_yaml(RigConfig, self.rig)


class ExpertPlanner(ExpertAgent):
    """The privileged expert as a waypoint source: where it would be in 0.5 .. 2.5 s (see the module docstring).

    Call `waypoints()` once per tick (it advances the expert's state: route progress, stop signs served);
    the control the expert would apply this tick is then `last_control`.
    """

    def _idm(self, v: float, v0: float, gaps: list[tuple[float, float, float]]) -> float:
        acc = super()._idm(v, v0, gaps)
        self.last_acc, self.last_v0 = acc, v0
        return acc

    def waypoints(self, n: int = N_WAYPOINTS, dt: float = WAYPOINT_DT_S) -> np.ndarray:
        """[n, 2] waypoints in the ego's (rear-axle) frame, `dt` apart, on the route centre line."""
        self.last_control = self.run_step()
        ego = self.world.egos[self.ego_id]
        v, a, v_max = max(float(ego.v), 0.0), self.last_acc, max(self.last_v0, float(ego.v))
        step, d, out = 0.05, 0.0, []
        for k in range(1, n + 1):                     # integrate the speed under constant acceleration, clipped
            t0 = (k - 1) * dt
            for i in range(round(dt / step)):
                vt = min(max(v + a * (t0 + (i + 0.5) * step), 0.0), v_max)
                d += vt * step
            out.append(self.s + d)
        pts = self.route.point_at(np.minimum(np.array(out), self.route.length))
        return to_ego_frame(pts, (ego.x, ego.y, ego.yaw))


@dataclass
class _Ego:
    role: str
    actor_id: int
    route: Any
    scorer: RouteScorer
    labels: LabelMaker
    expert: ExpertPlanner | None
    control: Control | None = None
    control_key: int = -(2 ** 62)      # stamp (ns) of the newest control received (none yet)
    commands: int = 0
    missed_ticks: int = 0
    infractions_sent: int = 0
    done: bool = False
    final_status: str = ""


class ClosedLoopWorld:
    """The world bridge's logic (module docstring). `run()` blocks until the routes end, `duration_s`, or `stop()`."""

    def __init__(self, bus: Any, cfg: WorldBridgeConfig) -> None:
        self.bus = bus
        self.cfg = cfg
        self.world = World(cfg.town, seed=cfg.seed, n_vehicles=None if cfg.n_vehicles < 0 else cfg.n_vehicles,
                           n_pedestrians=None if cfg.n_pedestrians < 0 else cfg.n_pedestrians)
        self.rig = SensorRig(cfg.rig_config()) if cfg.sensors_every else None
        routes = seeded_routes(self.world.town, cfg.seed, len(cfg.roles), min_length=cfg.route_length_m,
                               max_length=1.25 * cfg.route_length_m)
        self.egos: list[_Ego] = []
        for role, route in zip(cfg.roles, routes, strict=True):
            actor = self.world.spawn_ego(route)
            expert = None
            if cfg.expert_waypoints:
                expert = ExpertPlanner(self.world)
                expert.reset(RouteInfo(route, self.world.town.name, actor, route.route_id, self.world))
            self.egos.append(_Ego(role, actor, route, RouteScorer(route, self.world.town),
                                  LabelMaker(self.world, actor, route), expert))
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.done = threading.Event()
        self.exit_code = 0
        self.ticks = 0
        self.result: dict[str, Any] | None = None
        for ego in self.egos:
            bus.subscribe(B.topic(ego.role, "vehicle_control_cmd"), "carla_msgs/msg/CarlaEgoVehicleControl",
                          lambda msg, e=ego: self._on_control(e, msg), finite=True)

    # ------------------------------------------------------------------------------------------ controls
    def _on_control(self, ego: _Ego, msg: Any) -> None:
        key = B.stamp_key(msg.header)
        with self._cond:
            ego.commands += 1
            if key >= ego.control_key:      # a late control of an earlier tick never replaces a newer one
                ego.control_key = key
                ego.control = B.control_from_msg(msg)
                self._cond.notify_all()

    def _wait_controls(self, t: float, timeout_s: float) -> list[_Ego]:
        """Wait until every driving ego has a control stamped >= t; returns the egos still missing one."""
        key = B.time_key(t) - int(DT * 1e9 / 2)
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = [e for e in self.egos if not e.done and e.control_key < key]
                left = end - time.monotonic()
                if not missing or left <= 0 or self._stop.is_set():
                    return missing
                self._cond.wait(min(left, 0.1))

    # ------------------------------------------------------------------------------------------ publishing
    def publish_frame(self) -> None:
        """Everything of the current frame (module docstring), all stamped with the simulated time."""
        w, t = self.world, self.world.time_s
        self.bus.publish("/clock", B.clock_msg(t))
        sensors = bool(self.cfg.sensors_every) and self.ticks % self.cfg.sensors_every == 0
        for ego in self.egos:
            st = w.ego_state(ego.actor_id)
            role = ego.role
            if sensors and self.rig is not None:
                obs = self.rig.observe(w.scene_view(ego.actor_id))
                for c in self.rig.config.cameras:
                    self.bus.publish(B.topic(role, c.name), B.image_msg(obs[c.name], t, f"{role}/{c.name}"))
                self.bus.publish(B.topic(role, "lidar"), B.pointcloud_msg(obs["lidar"], t, f"{role}/lidar"))
                self.bus.publish(B.topic(role, "gnss"), B.gnss_msg(st, role))
            if sensors or not self.cfg.sensors_every:
                labels = ego.labels.current(ego.scorer.progress)
                self.bus.publish(B.topic(role, "navigation"), B.navigation_msg(labels, t, role, ego.route.length))
            if ego.expert is not None and not ego.done:
                self.bus.publish(B.topic(role, "expert_waypoints"),
                                 B.path_msg(ego.expert.waypoints(), t, f"{role}/base_link"))
            # odometry last: a controller that acts on odometry has the frame's other messages already queued
            self.bus.publish(B.topic(role, "speedometer"), B.codec.new("std_msgs/msg/Float32", data=float(st.speed)))
            self.bus.publish(B.topic(role, "odometry"), B.odometry_msg(st, role))

    def _publish_scores(self, final: bool) -> None:
        t = self.world.time_s
        for ego in self.egos:
            rec = ego.scorer.record()
            status = ego.final_status or (STATUS_STOPPED if final and rec.status == STATUS_RUNNING else None)
            self.bus.publish(B.topic(ego.role, "driving_score"), B.score_msg(rec, ego.role, t, final, status))

    # ------------------------------------------------------------------------------------------ stepping
    def step(self) -> None:
        """Step the world with each ego's latest control (full brake before the first / after its route ended)."""
        w = self.world
        with self._cond:
            controls = {e.actor_id: (Control(brake=1.0) if e.done or e.control is None else e.control)
                        for e in self.egos}
        w.step(controls)
        self.ticks += 1
        for ego in self.egos:
            if ego.done:
                continue
            e = w.egos[ego.actor_id]
            status = ego.scorer.update(w.time_s, e.center(), e.yaw, e.v, w.events(ego.actor_id))
            for inf in ego.scorer.infractions[ego.infractions_sent:]:
                self.bus.publish(B.topic(ego.role, "infraction"), B.infraction_msg(inf, ego.role))
                log.info("%s: %s at t=%.2f s (%s)", ego.role, inf.kind, inf.time_s, inf.info)
            ego.infractions_sent = len(ego.scorer.infractions)
            if status != STATUS_RUNNING:
                ego.done, ego.final_status = True, status
                log.info("%s: route %s ended: %s", ego.role, ego.route.route_id, status)

    def _startup(self) -> bool:
        """Re-publish the first frame until every ego's control for it has arrived (or the timeout)."""
        end = time.monotonic() + self.cfg.startup_timeout_s
        while not self._stop.is_set():
            self.publish_frame()
            if not self._wait_controls(self.world.time_s, min(1.0, self.cfg.tick_timeout_s)):
                return True
            if time.monotonic() >= end:
                missing = [e.role for e in self._wait_controls(self.world.time_s, 0.0)]
                log.error("no control from %s within startup_timeout_s=%.0f s: is a controller running on "
                          "/carla/<role>/vehicle_control_cmd?", missing, self.cfg.startup_timeout_s)
                return False
        return False

    def run(self) -> dict[str, Any]:
        """The tick loop; returns (and with `result_path` writes) the scores of every ego."""
        cfg = self.cfg
        t_wall0 = time.monotonic()
        log.info("world %s seed %d: %s; %s mode", self.world.town.name, cfg.seed,
                 ", ".join(f"{e.role} on route {e.route.route_id} ({e.route.length:.0f} m)" for e in self.egos),
                 "synchronous" if cfg.synchronous else "asynchronous")
        ok = self._startup() if cfg.synchronous else True
        if not ok and not self._stop.is_set():
            self.exit_code = 1
        t0, next_score = self.world.time_s, self.world.time_s + cfg.score_every_s
        period = DT / cfg.real_time_factor if cfg.real_time_factor > 0 else 0.0
        t_next = time.monotonic()
        first = True
        while ok and not self._stop.is_set():
            if all(e.done for e in self.egos):
                break
            if cfg.duration_s and self.world.time_s - t0 >= cfg.duration_s - 1e-9:
                break
            if not first:
                self.publish_frame()
            first = False
            if cfg.synchronous:
                for ego in self._wait_controls(self.world.time_s, cfg.tick_timeout_s):
                    if self._stop.is_set():
                        break
                    ego.missed_ticks += 1
                    log.warning("%s: no control for t=%.2f s within %.1f s; stepping with the last one",
                                ego.role, self.world.time_s, cfg.tick_timeout_s)
            elif period:
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))
            self.step()
            if self.world.time_s >= next_score - 1e-9:
                self._publish_scores(final=False)
                next_score += cfg.score_every_s
        try:
            self._publish_scores(final=True)
        except Exception as exc:           # the transport may already be gone when we were stopped
            if not self._stop.is_set():
                raise
            log.warning("final scores not published (stopping): %s", exc)
        self.result = self.summary(time.monotonic() - t_wall0)
        if cfg.result_path:
            import json

            from flad_core.atomic import atomic_write_text

            atomic_write_text(Path(cfg.result_path), json.dumps(self.result, indent=2))
        log.info("closed loop done: %s", {e["role"]: (e["status"], round(e["ds"], 1)) for e in self.result["egos"]})
        return self.result

    def summary(self, wall_s: float) -> dict[str, Any]:
        from flad_sim.metrics import summarize

        egos, records = [], []
        for ego in self.egos:
            rec = ego.scorer.record()
            records.append(rec)
            d = rec.to_dict()
            d["status"] = ego.final_status or STATUS_STOPPED
            d.update(role=ego.role, commands=ego.commands, missed_ticks=ego.missed_ticks)
            egos.append(d)
        s = summarize(records)
        return {"town": self.world.town.name, "seed": self.cfg.seed, "synchronous": self.cfg.synchronous,
                "ticks": self.ticks, "sim_time_s": round(self.world.time_s, 3), "wall_s": round(wall_s, 2),
                "ds": s["ds"], "rc": s["rc"], "is": s["is"], "egos": egos,
                "completed": self.exit_code == 0 and not math.isnan(s["ds"])}

    # ------------------------------------------------------------------------------------------ component
    def start(self) -> None:
        """Run on a thread (the node adapters' way); `done` is set when it has finished."""
        def target() -> None:
            try:
                self.run()
            except Exception:
                if self._stop.is_set():        # stopped by request while publishing: not a failure
                    log.warning("world bridge stopped", exc_info=True)
                else:
                    log.exception("world bridge failed")
                    self.exit_code = 1
            finally:
                self.done.set()

        self._thread = threading.Thread(target=target, name="world-bridge", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self.stop()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=10.0)
