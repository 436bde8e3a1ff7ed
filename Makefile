# The two commands of the README. Both set everything up first (scripts/bootstrap.sh).
.PHONY: demo test lint bootstrap clean ros-tier test-ros

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/flad demo

lint: bootstrap
	.venv/bin/ruff check src test docker setup.py
	.venv/bin/hadolint docker/Dockerfile.vehicle docker/Dockerfile.edge

test: lint
	.venv/bin/python -m pytest -q

# The real-ROS 2 tier (ROS 2 Jazzy wheels in .venv-ros, the workspace built by colcon in .ros-ws; see README).
ros-tier:
	./scripts/ros_tier.sh

test-ros: ros-tier
	bash -c 'source .ros-ws/env.sh && python -m ruff check test_ros && exec python -m pytest -q test_ros'

clean:
	rm -rf .venv .venv-ros .ros-ws build *.egg-info .pytest_cache .ruff_cache
