"""CELLAdapt AD-LLM: adapter/head shapes, a training step, LoRA, distillation loss, save/load round trip.

Everything is offline: tiny randomly-initialised LLaMA configs and a tokenizer built from the templates.
"""

from __future__ import annotations

import math

import pytest
import torch

from flad_edge.celladapt.data import FeatureSet, synthetic_feature_set
from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, VisualAdapter, tiny_llama
from flad_edge.celladapt.tokenizer import build_tokenizer
from flad_edge.celladapt.train import (
    FitConfig,
    apply_lora,
    distill_loss,
    evaluate,
    fit,
    make_optimizer,
    merge_lora,
    train_step,
    trainable_fraction,
    waypoint_l1,
)

torch.set_num_threads(1)


def tiny(name: str = "t", hidden: int = 32, layers: int = 1, queries: int = 3, seed: int = 0) -> ADLLM:
    return ADLLM.build(ADLLMConfig(name=name, llm=tiny_llama(hidden, layers, 4, 2),
                                   adapter=AdapterConfig(d_model=32, n_queries=queries), seed=seed))


@pytest.fixture(scope="module")
def data() -> FeatureSet:
    return synthetic_feature_set(96, seed=1)


def test_tokenizer_is_offline_and_covers_instructions() -> None:
    tok = build_tokenizer()
    ids = tok("turn left at the next intersection in 37 m")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["3", "7", "m"]


def test_adapter_and_head_shapes() -> None:
    model = tiny(queries=3)
    feats = torch.randn(4, 31, 64)
    ids, mask = model.encode_text(["turn left now", "follow the lane for 20 m", "go straight through this "
                                   "intersection", "turn right now"], ["red light ahead", "", "", ""])
    assert ids.shape == mask.shape == (4, model.cfg.max_text_tokens)
    vis = model.adapter(feats, model._base().get_input_embeddings()(ids), mask)
    assert vis.shape == (4, 3, model.hidden_size)
    out = model(feats, ids, mask)
    assert out["waypoints"].shape == (4, 5, 2)
    assert out["end_logit"].shape == (4,)
    assert out["hidden"].shape == (4, model.cfg.max_text_tokens + 3 + 1 + 5, model.hidden_size)   # + navigation
    with pytest.raises(ValueError, match="expects"):
        model.adapter(torch.randn(2, 30, 64))


def test_adapter_is_instruction_aware() -> None:
    adapter = VisualAdapter(AdapterConfig(d_model=32, n_queries=2), llm_hidden=16)
    f = torch.randn(1, 31, 64)
    a = adapter(f, torch.randn(1, 5, 16), torch.ones(1, 5))
    b = adapter(f, torch.randn(1, 5, 16), torch.ones(1, 5))
    assert not torch.allclose(a, b)


def test_batched_equals_single(data: FeatureSet) -> None:
    model = tiny()
    b = next(data.batches(4, shuffle=False))
    full = model.predict(b["features"], b["instruction"], b["notice"])
    one = model.predict(b["features"][2:3], b["instruction"][2:3], b["notice"][2:3])
    torch.testing.assert_close(full[2:3], one, atol=1e-5, rtol=1e-5)


def test_training_step_lowers_waypoint_l1(data: FeatureSet) -> None:
    model = tiny()
    before = evaluate(model, data)["wp_l1"]
    fit(model, data, FitConfig(steps=25, batch_size=16, lr=3e-3, warmup_steps=2))
    after = evaluate(model, data)["wp_l1"]
    assert after < 0.7 * before


def test_one_step_decreases_loss_on_the_same_batch(data: FeatureSet) -> None:
    model = tiny()
    batch = next(data.batches(16, shuffle=False))
    opt = make_optimizer(model, FitConfig(lr=1e-3))
    first = train_step(model, batch, opt)["loss"]
    model.eval()
    with torch.no_grad():
        again = float(waypoint_l1(model.predict(batch["features"], batch["instruction"]), batch["waypoints"]))
    assert again < first


def test_lora_trains_only_adapter_weights(data: FeatureSet) -> None:
    model = apply_lora(tiny())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert 0 < trainable_fraction(model) < 0.2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit(model, data, FitConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=1))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)
    # merging folds LoRA in without changing the function
    b = next(data.batches(4, shuffle=False))
    before = model.predict(b["features"], b["instruction"])
    merge_lora(model)
    assert not model.is_lora
    torch.testing.assert_close(model.predict(b["features"], b["instruction"]), before, atol=1e-5, rtol=1e-4)


def test_distillation_loss_is_l1_on_waypoints() -> None:
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[1.5, 1.0], [3.0, 6.0]]])
    g = torch.tensor([[[0.0, 2.0], [3.0, 4.0]]])
    # |diffs| to teacher: 0.5, 1, 0, 2 -> mean 0.875; to ground truth: 1, 0, 0, 0 -> mean 0.25
    assert float(distill_loss(s, t)) == pytest.approx(0.875)
    assert float(distill_loss(s, t, g, alpha=0.5)) == pytest.approx(0.5 * 0.875 + 0.5 * 0.25)
    t.requires_grad_(True)
    distill_loss(s.requires_grad_(True), t).backward()
    assert t.grad is None                       # the teacher is a target, not trained


def test_distillation_moves_student_towards_teacher(data: FeatureSet) -> None:
    teacher = tiny("teacher", hidden=48, layers=2, seed=3)
    fit(teacher, data, FitConfig(steps=15, batch_size=16, lr=3e-3, warmup_steps=2))
    student = tiny("student", hidden=32, layers=1, seed=4)
    b = next(data.batches(32, shuffle=False))

    def gap() -> float:
        return float(waypoint_l1(student.predict(b["features"], b["instruction"]),
                                 teacher.predict(b["features"], b["instruction"])))

    before = gap()
    fit(student, data, FitConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=2, alpha=1.0), teacher=teacher)
    assert gap() < 0.7 * before


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, data: FeatureSet, lora: bool) -> None:
    model = tiny()
    if lora:
        apply_lora(model)
        fit(model, data, FitConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=1))
    model.save_pretrained(tmp_path / "m")
    loaded = ADLLM.from_pretrained(tmp_path / "m")
    assert loaded.is_lora == lora
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    b = next(data.batches(8, shuffle=False))
    assert torch.equal(model.predict(b["features"], b["instruction"], b["notice"]),
                       loaded.predict(b["features"], b["instruction"], b["notice"]))


def test_feature_set_cache_round_trip(tmp_path, data: FeatureSet) -> None:
    data.save(tmp_path / "f.npz")
    back = FeatureSet.load(tmp_path / "f.npz")
    assert torch.equal(back.features, data.features) and back.instructions == data.instructions
    assert data.eoi is not None and torch.equal(back.eoi, data.eoi)
    assert len(data.select(towns=["Town01"])) + len(data.select(exclude_towns=["Town01"])) == len(data)


def test_waypoint_metrics_by_hand():
    from flad_edge.celladapt.train import waypoint_metrics

    gt = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]],
                       [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.0]]])   # moving, then standing
    pred = gt * torch.tensor([0.8, 1.0]) + torch.tensor([0.0, 0.3])  # 20 % short, 0.3 m lateral offset
    m = waypoint_metrics(pred, gt)
    # x errors 0.2..1.0 (sample 0) and 0..0.1 (sample 1); y errors 0.3 everywhere
    l1_0 = (sum(0.2 * k for k in range(1, 6)) + 5 * 0.3) / 10
    l1_1 = (0.1 + 5 * 0.3) / 10
    assert m["wp_l1"] == pytest.approx((l1_0 + l1_1) / 2)
    assert m["wp_fde"] == pytest.approx((math.hypot(1.0, 0.3) + math.hypot(0.1, 0.3)) / 2)
    assert m["progress_ratio"] == pytest.approx(math.hypot(4.0, 0.3) / 5.0)   # only the moving sample counts
    assert waypoint_metrics(gt[1:], gt[1:])["progress_ratio"] is None         # nobody moving: no ratio


def test_end_of_instruction_labels_by_hand():
    from flad_edge.celladapt.data import end_of_instruction_labels

    cmds = [0, 0, 0, 0, 0, 2, 2, 3, 3, 3]
    # horizon 2: frames 3, 4 (command 2 at frame 5), 5, 6 (3 at 7) are completing; the last frames are not
    assert end_of_instruction_labels(cmds, 2).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert end_of_instruction_labels(cmds, 1).tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0]
    assert end_of_instruction_labels([4], 4).tolist() == [0] and end_of_instruction_labels([], 4).tolist() == []


def test_eoi_metrics_by_hand():
    from flad_edge.celladapt.train import eoi_metrics

    logits = torch.tensor([2.0, 1.0, -1.0, -3.0, 0.5, -0.2])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])    # tp 2, fp 1, fn 1, tn 2
    m = eoi_metrics(logits, labels)
    assert m["positive_rate"] == 0.5 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_training_learns_the_end_of_instruction_flag(data: FeatureSet) -> None:
    model = tiny()
    before = evaluate(model, data)["eoi"]
    r = fit(model, data, FitConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=2, eoi_weight=1.0))
    after = evaluate(model, data)["eoi"]
    assert after["balanced_accuracy"] > max(0.8, before["balanced_accuracy"] or 0.0), (before, after, r)
    # with the flag switched off its head stays where it started
    frozen = tiny()
    w0 = frozen.end_head.weight.detach().clone()
    fit(frozen, data, FitConfig(steps=5, batch_size=16, lr=3e-3, eoi_weight=0.0))
    assert torch.equal(frozen.end_head.weight, w0)


def test_navigation_token_reads_the_target_point(tmp_path, data: FeatureSet) -> None:
    model = tiny()
    b = next(data.batches(4, shuffle=False))
    left, right = torch.tensor([[15.0, 8.0]] * 4), torch.tensor([[15.0, -8.0]] * 4)
    a = model.predict(b["features"], b["instruction"], b["notice"], left)
    assert not torch.allclose(a, model.predict(b["features"], b["instruction"], b["notice"], right))
    # no target point (None, or NaN rows as the service passes them) is one "unknown" token
    none = model.predict(b["features"], b["instruction"], b["notice"])
    nan = model.predict(b["features"], b["instruction"], b["notice"], torch.full((4, 2), float("nan")))
    assert torch.equal(none, nan) and torch.isfinite(none).all()
    # training uses the batch's target points: the synthetic set's lateral target decides the turn
    assert "target_point" in b
    plain = tiny(name="p")
    plain.cfg.navigation = False
    plain = ADLLM.build(plain.cfg)
    assert plain.nav_embed is None
    assert torch.equal(plain.predict(b["features"], b["instruction"], b["notice"], left),
                       plain.predict(b["features"], b["instruction"], b["notice"], right))


def test_models_saved_before_the_navigation_token_still_load(tmp_path) -> None:
    import json

    model = ADLLM.build(ADLLMConfig(name="old", llm=tiny_llama(32, 1, 4, 2), navigation=False,
                                    adapter=AdapterConfig(d_model=32, n_queries=2)))
    model.save_pretrained(tmp_path / "m")
    meta_path = tmp_path / "m" / "celladapt.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["navigation"]           # what an older save looks like
    meta_path.write_text(json.dumps(meta))
    loaded = ADLLM.from_pretrained(tmp_path / "m")
    assert loaded.cfg.navigation is False and loaded.nav_embed is None
