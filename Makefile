# The two commands of the README. Both set everything up first (scripts/bootstrap.sh).
.PHONY: demo test test-main lint imports bootstrap clean ros-tier test-ros

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/flad demo

lint: bootstrap
	.venv/bin/ruff check src test test_ros launch docker setup.py scripts
	$(MAKE) --no-print-directory imports
	.venv/bin/hadolint docker/Dockerfile.vehicle docker/Dockerfile.edge

# Import rules, lazy imports included: the layers flad_bench -> flad_edge -> flad_vehicle -> flad_sim -> flad_core
# and no cycles (import-linter, pyproject.toml [tool.importlinter]), no cycle between any two modules
# (scripts/check_import_cycles.py). Both run, so one report names every violation.
imports:
	status=0; \
	.venv/bin/lint-imports --config pyproject.toml --no-cache --no-logo || status=1; \
	.venv/bin/python scripts/check_import_cycles.py || status=1; \
	exit $$status

# `make test`: the main tier, then the real-ROS 2 tier as its own, labelled stage.
test: test-main test-ros

test-main: lint
	@echo "== main tier (lint + pytest test/) =="
	.venv/bin/python -m pytest -q

# The real-ROS 2 tier (ROS 2 Jazzy wheels in .venv-ros, the workspace built by colcon in .ros-ws; see README).
# A ROS process sometimes dies at shutdown (SIGSEGV in rclpy/Fast DDS teardown, or hangs there and ignores
# SIGTERM: 2 of 4 full runs on 2026-12-06, root cause not found); only tests failing with exactly those
# signatures are re-run, at most twice, and pytest reports every rerun.
ROS_RERUNS = --reruns 2 --only-rerun "rc -11" --only-rerun "ignored SIGTERM"
ros-tier:
	./scripts/ros_tier.sh

test-ros: ros-tier
	@echo "== real-ROS tier (rclpy + colcon-built flad_msgs; pytest test_ros/) =="
	bash -c 'source .ros-ws/env.sh && python -m ruff check test_ros && exec python -m pytest -q test_ros $(ROS_RERUNS)'

clean:
	rm -rf .venv .venv-ros .ros-ws build *.egg-info .pytest_cache .ruff_cache
