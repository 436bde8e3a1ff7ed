# The two commands of the README. Both set everything up first (scripts/bootstrap.sh).
.PHONY: demo test test-main lint bootstrap clean ros-tier test-ros

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/flad demo

lint: bootstrap
	.venv/bin/ruff check src test test_ros launch docker setup.py
	.venv/bin/hadolint docker/Dockerfile.vehicle docker/Dockerfile.edge

# `make test`: the main tier, then the real-ROS 2 tier as its own, labelled stage.
test: test-main test-ros

test-main: lint
	@echo "== main tier (lint + pytest test/) =="
	.venv/bin/python -m pytest -q

# The real-ROS 2 tier (ROS 2 Jazzy wheels in .venv-ros, the workspace built by colcon in .ros-ws; see README).
ros-tier:
	./scripts/ros_tier.sh

test-ros: ros-tier
	@echo "== real-ROS tier (rclpy + colcon-built flad_msgs; pytest test_ros/) =="
	bash -c 'source .ros-ws/env.sh && python -m ruff check test_ros && exec python -m pytest -q test_ros'

clean:
	rm -rf .venv .venv-ros .ros-ws build *.egg-info .pytest_cache .ruff_cache
