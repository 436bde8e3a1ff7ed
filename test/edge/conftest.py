"""Shared fixtures for the SWIFT tests: a tiny trained DQN policy, saved and reloaded (the reuse path)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def swift_policy_dir(tmp_path_factory: pytest.TempPathFactory):
    """A directory holding small trained policies for both objectives (what $FLAD_SWIFT_POLICY_DIR points at)."""
    from flad_edge.swift.dqn import default_policy_path, train

    d = tmp_path_factory.mktemp("swift_policy")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLAD_SWIFT_POLICY_DIR", str(d))
    for objective in ("path", "bottleneck"):
        train(episodes=40, objective=objective, seed=0).save(default_policy_path(objective))
    mp.undo()
    return d


@pytest.fixture(scope="session")
def swift_policy(swift_policy_dir):
    from flad_edge.swift.dqn import DQNPolicy

    return DQNPolicy.load(swift_policy_dir / "dqn_path.safetensors")
