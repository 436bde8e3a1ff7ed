"""The typed pipeline description: validation, owners, and the PipelineAssignment message round trip (CDR)."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_core import codec
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline, PipelineError, Stage, pipeline_from_owners


@st.composite
def pipelines(draw):
    n_layers = draw(st.integers(1, 40))
    k = draw(st.integers(1, min(6, n_layers)))
    cuts = sorted(draw(st.sets(st.integers(1, n_layers - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
    bounds = [0, *cuts, n_layers]
    names = draw(st.lists(st.text("abcdefghv0123456789", min_size=1, max_size=6), min_size=k, max_size=k,
                          unique=True))
    return Pipeline.of((names[i], bounds[i], bounds[i + 1]) for i in range(k)), n_layers


@settings(max_examples=60, deadline=None)
@given(pipelines(), st.sampled_from(["fp32", "int8"]), st.integers(0, 2**40), st.booleans())
def test_assignment_survives_the_wire_exactly(pn, codec_name, first_step, u_shaped):
    pipe, n = pn
    a = Assignment(pipeline_id="r3-c1-x-abc~2", round=3, cluster_id="c1", method="swift", pipeline=pipe,
                   members={v: f"tcp://127.0.0.1:{7000 + i}" for i, v in enumerate(pipe.members)},
                   inboxes=[f"tcp://127.0.0.1:{8000 + i}" for i in range(len(pipe))],
                   layer_owner=["edge"] * n, codec=codec_name, n_micro=2, batch_size=4, steps=7,
                   first_step=first_step, time_scale=0.02, backup_every=2, link_timeout_s=30.0,
                   publish_progress=True, u_shaped=u_shaped)
    wire = codec.encode(a.to_msg(), "flad_msgs/msg/PipelineAssignment")
    back = Assignment.from_msg(codec.decode(wire, "flad_msgs/msg/PipelineAssignment"))
    assert back == a
    assert back.pipeline.owners(n) == [v for v, s, e in pipe for _ in range(s, e)]
    assert pipeline_from_owners(back.pipeline.owners(n)) == pipe
    assert back.loss_stage == (0 if u_shaped and len(pipe) > 1 else len(pipe) - 1)


def test_fanin_assignment_survives_the_wire_and_names_every_participant():
    trunk = Pipeline.of([("agx", 4, 9), ("n2", 9, 23)])
    a = Assignment(pipeline_id="r1-c1-agx-abc", round=1, cluster_id="c1", method="fanin", pipeline=trunk,
                   members={"n1": "tcp://a:1", "n2": "tcp://a:2", "agx": "tcp://a:3"},
                   inboxes=["tcp://a:13", "tcp://a:12"], layer_owner=["edge"] * 23, steps=3,
                   fanin_sources=["agx", "n1", "n2"], fanin_inboxes=["tcp://a:13", "tcp://a:11", "tcp://a:12"])
    wire = codec.encode(a.to_msg(), "flad_msgs/msg/PipelineAssignment")
    back = Assignment.from_msg(codec.decode(wire, "flad_msgs/msg/PipelineAssignment"))
    assert back == a and back.is_fanin and back.participants == ["agx", "n1", "n2"]
    assert [back.inbox_of(v) for v in ("n1", "n2", "agx")] == ["tcp://a:11", "tcp://a:12", "tcp://a:13"]
    with pytest.raises(PipelineError, match="takes no part"):
        back.inbox_of("n9")
    msg = a.to_msg()
    msg.fanin_source_inboxes = msg.fanin_source_inboxes[:2]        # a source without an inbox is refused
    with pytest.raises(PipelineError, match="3 fan-in sources but 2"):
        Assignment.from_msg(msg)
    plain = Assignment.from_msg(codec.decode(codec.encode(dataclasses.replace(a, fanin_sources=[], fanin_inboxes=[])
                                                          .to_msg(), "flad_msgs/msg/PipelineAssignment"),
                                             "flad_msgs/msg/PipelineAssignment"))
    assert not plain.is_fanin and plain.participants == ["agx", "n2"]


def test_a_stage_unpacks_and_reads_as_json_triples():
    pipe = Pipeline.of([("a", 0, 3), ("b", 3, 5)])
    v, s, e = pipe[1]
    assert (v, s, e) == ("b", 3, 5) and pipe[1] == Stage("b", 3, 5) == ("b", 3, 5)
    assert pipe.first == "a" and pipe.members == ["a", "b"] and pipe.ranges == [(0, 3), (3, 5)]
    assert pipe.to_json() == [["a", 0, 3], ["b", 3, 5]]
    assert pipe.describe() == "a[0:3) -> b[3:5)"


@pytest.mark.parametrize(("stages", "match"), [
    ([], "at least one stage"),
    ([("a", 0, 2), ("b", 3, 6)], "contiguous"),
    ([("a", 0, 3), ("a", 3, 6)], "appears twice"),
    ([("a", 0, 3), ("b", 3, 1)], "layers \\[3, 1\\)"),
])
def test_bad_pipelines_are_refused_with_the_reason(stages, match):
    with pytest.raises(PipelineError, match=match):
        Pipeline.of(stages)


def test_owners_require_the_whole_model():
    with pytest.raises(PipelineError, match="covers \\[0, 2\\), the model has 6 layers"):
        Pipeline.of([("a", 0, 2)]).owners(6)
    assert pipeline_from_owners(["a", "b", "a"]) is None      # a vehicle holding two runs is no pipeline


def test_a_message_with_missing_addresses_is_refused():
    pipe = Pipeline.of([("a", 0, 2), ("b", 2, 4)])
    a = Assignment("p", 0, "c", "exact", pipe, {"a": "tcp://x", "b": "tcp://y"}, ["tcp://1", "tcp://2"],
                   ["edge"] * 4)
    msg = a.to_msg()
    msg.stage_inbox_addresses = ["tcp://1"]
    with pytest.raises(PipelineError, match="2 stages but 1 inbox"):
        Assignment.from_msg(msg)
    msg = a.to_msg()
    msg.member_control_addresses = ["tcp://x"]
    with pytest.raises(PipelineError, match="2 members but 1 control"):
        Assignment.from_msg(msg)
