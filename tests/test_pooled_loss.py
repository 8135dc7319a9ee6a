"""objective.pooled_loss: the student's mean-pooled output, through a linear head, regresses the
teacher's mean target normalised over the batch; v1 and 2.0, its config and the presets using it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from d2v_train.models.transformer import mean_pool
from d2v_train.objective import ObjectiveConfig, normalize, pooled_targets

from test_configs import compose_cfg, options
from test_d2v2 import v2_module
from test_pretrain import fixed_batch, module_for, run


def test_mean_pool_and_targets_leave_padding_out_and_normalise_over_the_batch() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(5, 7, 4, generator=g)
    pad = torch.zeros(5, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[3, 2:] = True
    changed = targets.clone()
    changed[pad] = 100.0  # whatever sits at padded positions
    got = pooled_targets(changed, pad)
    means = torch.stack([targets[b][~pad[b]].mean(0) for b in range(5)])
    expected = (means - means.mean(0)) / means.var(0, unbiased=False).add(1e-5).sqrt()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(mean_pool(changed, pad), means)
    torch.testing.assert_close(got.mean(0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_v1_adds_the_weighted_pooled_term_and_trains_its_head(modality: str) -> None:
    batch = fixed_batch(modality)
    plain = module_for(modality)
    pooled = module_for(modality, pooled_loss=3.0)
    assert plain.pooled_head is None and not any(k.startswith("pooled_head") for k in plain.state_dict())
    pooled.student.load_state_dict(plain.student.state_dict())
    pooled.head.load_state_dict(plain.head.state_dict())
    pooled.teacher.model.load_state_dict(plain.teacher.model.state_dict())

    def objective(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))

    base, out = objective(plain), objective(pooled)
    assert float(out["pooled_loss"]) > 0
    torch.testing.assert_close(out["loss"], base["loss"] + 3.0 * out["pooled_loss"])
    torch.testing.assert_close(out["global_loss"], base["global_loss"] + 3.0 * out["pooled_loss"])
    out["loss"].backward()
    assert pooled.pooled_head.weight.grad is not None and pooled.pooled_head.weight.grad.abs().sum() > 0
    pooled.optim.total_steps = 60
    in_optimizer = {id(p) for g in pooled.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert {id(p) for p in pooled.pooled_head.parameters()} <= in_optimizer
    before = float(objective(pooled)["pooled_loss"])
    run(pooled, batch, steps=60)
    assert float(objective(pooled)["pooled_loss"]) < 0.6 * before


def test_text_pooled_term_leaves_out_special_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mean runs over the tokens the masks may pick: a changed `<s>` / `</s>` embedding moves
    the per-token loss only through attention, never by entering the pooled mean directly."""
    model = module_for("text", pooled_loss=1.0)
    batch = fixed_batch("text")
    seen: dict[str, torch.Tensor] = {}
    import d2v_train.lightning.pretrain as pretrain

    add, targets_of = pretrain.add_pooled_loss, pretrain.pooled_targets

    def spy_add(out, weight, head, hidden, hidden_padding, target):  # type: ignore[no-untyped-def]
        seen["hidden_padding"] = hidden_padding
        return add(out, weight, head, hidden, hidden_padding, target)

    def spy_targets(targets, padding_mask=None, weights=None):  # type: ignore[no-untyped-def]
        seen["target_padding"] = padding_mask
        return targets_of(targets, padding_mask, weights)

    monkeypatch.setattr(pretrain, "add_pooled_loss", spy_add)
    monkeypatch.setattr(pretrain, "pooled_targets", spy_targets)
    model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))
    ids = batch["inputs"]
    expected = batch["padding_mask"] | torch.isin(ids, torch.tensor([0, 1, 2, 4]))
    assert torch.equal(seen["hidden_padding"], expected) and torch.equal(seen["target_padding"], expected)


def test_weighted_target_means_weigh_tokens_and_leave_padding_out() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(4, 6, 3, generator=g)
    weights = torch.rand(4, 6, generator=g) + 0.1
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[2, 3:] = True
    changed = targets.clone()
    changed[pad] = 50.0
    means = torch.stack([(targets[b] * weights[b, :, None])[~pad[b]].sum(0) / weights[b][~pad[b]].sum() for b in range(4)])
    expected = (means - means.mean(0)) / means.var(0, unbiased=False).add(1e-5).sqrt()
    torch.testing.assert_close(pooled_targets(changed, pad, weights), expected)
    # equal weights are the plain mean; weights that differ are not
    torch.testing.assert_close(pooled_targets(changed, pad, torch.full((4, 6), 3.0)), pooled_targets(changed, pad))
    assert not torch.allclose(pooled_targets(changed, pad, weights), pooled_targets(changed, pad))


@pytest.mark.parametrize("version", [1, 2])
def test_idf_weights_come_from_the_training_text_and_reach_the_target(version: int) -> None:
    """objective.pooled_weights=idf: setup() computes each token id's IDF over the data module's
    training set (special tokens 0), and the pooled target is the IDF-weighted mean."""
    from types import SimpleNamespace

    batch = fixed_batch("text")
    inputs, pad = batch["inputs"], batch["padding_mask"]
    make = (lambda **kw: v2_module("text", layer_norm="layer", **kw)) if version == 2 else (lambda **kw: module_for("text", **kw))
    model = make(pooled_loss=1.0, pooled_weights="idf")
    with pytest.raises(ValueError, match="pooled_weights=idf computes its weights from the training text"):
        model.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    model.setup("fit")  # no trainer, no data module: nothing to compute from yet
    assert model.pooled_token_idf is None
    corpus = [{"inputs": row[~row_pad]} for row, row_pad in zip(inputs, pad)]
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=corpus))  # type: ignore[assignment]
    model.setup("fit")
    idf = model.pooled_token_idf
    assert idf is not None and idf.shape == (model.student.config.vocab_size,)
    assert float(idf[torch.tensor([0, 1, 2, 4])].abs().max()) == 0.0  # <s> <pad> </s> <mask>
    word = int(inputs[0, 1])
    docs_with = sum(bool((d["inputs"] == word).any()) for d in corpus)
    assert float(idf[word]) == pytest.approx(torch.log(torch.tensor((1.0 + len(corpus)) / (1.0 + docs_with))).item() + 1.0)

    uniform = make(pooled_loss=1.0)
    uniform.load_state_dict(model.state_dict())
    a = model.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    b = uniform.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    assert float(a["pooled_loss"]) != pytest.approx(float(b["pooled_loss"]))
    model.pooled_token_idf = torch.ones_like(idf)  # equal weights: the uniform mean
    c = model.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    torch.testing.assert_close(c["pooled_loss"], b["pooled_loss"])


def test_idf_weights_are_for_text_only() -> None:
    with pytest.raises(ValueError, match="pooled_weights"):
        ObjectiveConfig.from_dict({"pooled_weights": "tfidf"})
    with pytest.raises(ValueError, match="pooled_weights=idf weighs token ids"):
        module_for("vision", pooled_loss=1.0, pooled_weights="idf")


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_2_0_adds_the_pooled_term_over_the_kept_tokens_of_every_copy(modality: str) -> None:
    norm = {"layer_norm": "layer"} if modality == "text" else {}  # text 2.0 targets are instance-normalised
    plain, pooled = v2_module(modality, **norm), v2_module(modality, pooled_loss=2.0, **norm)
    missing = pooled.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("pooled_head.") for k in missing)
    batch = fixed_batch(modality)
    inputs, pad = batch["inputs"], batch["padding_mask"]
    base = plain.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    forward = pooled.pooled_head.forward
    pooled.pooled_head.forward = lambda x: seen.setdefault("pooled", x) is not None and forward(x)  # type: ignore[method-assign]
    out = pooled.compute_objective(inputs, pad, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], base["loss"] + 2.0 * out["pooled_loss"])
    assert seen["pooled"].shape == (3 * inputs.shape[0], 32)  # one mean per masked copy
    out["loss"].backward()
    assert pooled.pooled_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pooled.student.transformer.parameters())


def test_pooled_loss_weight_and_target_norm_are_checked() -> None:
    with pytest.raises(ValueError, match="objective.pooled_loss"):
        ObjectiveConfig.from_dict({"pooled_loss": -1.0})
    # instance-normalised targets average to exactly 0 over a sample: nothing to regress
    for norms in ({"layer_norm": "instance", "final_norm": "none"}, {"layer_norm": "layer", "final_norm": "instance"}):
        with pytest.raises(ValueError, match="pooled_loss needs targets"):
            ObjectiveConfig.from_dict({"pooled_loss": 1.0, **norms})
        assert float(pooled_targets(normalize(torch.randn(4, 9, 8), "instance")).abs().max()) < 1e-3
    ObjectiveConfig.from_dict({"pooled_loss": 1.0, "layer_norm": "instance", "final_norm": "layer"})
    ObjectiveConfig.from_dict({"pooled_loss": 0.0, "layer_norm": "instance"})


def test_text_preset_uses_it_and_no_published_recipe_does(tmp_path: Path) -> None:
    v1 = compose_cfg(["modality=text", "objective=d2v1_text"], tmp_path)
    assert v1.objective.pooled_loss == 3.0 and v1.objective.pooled_weights == "idf"
    v2 = compose_cfg(["modality=text"], tmp_path)
    assert v2.objective.pooled_loss == 3.0 and v2.objective.layer_norm == "layer" and v2.objective.pooled_weights == "idf"
    ObjectiveConfig.from_dict(OmegaConf.to_container(v2.objective, resolve=True))  # a valid combination
    for modality in ("vision", "audio"):
        for objective in (f"d2v1_{modality}", f"d2v2_{modality}"):
            cfg = compose_cfg([f"modality={modality}", f"objective={objective}"], tmp_path)
            assert cfg.objective.pooled_loss == 0.0, objective
    for recipe in options("experiment"):
        cfg = compose_cfg([f"experiment={recipe}"], tmp_path)
        assert OmegaConf.select(cfg, "objective.pooled_loss") == 0.0, recipe
        assert OmegaConf.select(cfg, "objective.pooled_weights") == "uniform", recipe


def test_resuming_a_checkpoint_of_another_model_layout_says_what_differs() -> None:
    """Turning the term on for a run whose checkpoint was written without it (or the reverse) is a
    one-line error naming the parameters, not torch's missing-keys dump."""
    from d2v_train.lightning.checkpointing import CheckpointRefusedError

    plain, pooled = module_for("text"), module_for("text", pooled_loss=1.0)
    with pytest.raises(CheckpointRefusedError, match=r"this run's model has pooled_head.bias, pooled_head.weight, which the checkpoint lacks.*ckpt_path=null"):
        pooled.on_load_checkpoint({"state_dict": plain.state_dict()})
    with pytest.raises(CheckpointRefusedError, match=r"the checkpoint holds pooled_head.bias, pooled_head.weight, which this run's model lacks"):
        plain.on_load_checkpoint({"state_dict": pooled.state_dict()})
    pooled.on_load_checkpoint({"state_dict": pooled.state_dict(), "d2v_skipped_steps": 2})
    assert pooled.skipped_steps == 2
