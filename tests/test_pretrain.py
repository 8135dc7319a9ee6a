"""Data2VecPretraining: every modality learns on a fixed batch and the teacher follows the EMA rule
exactly (one step per optimizer update, also under gradient accumulation)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from d2v_train.cli import config_dir
from d2v_train.lightning import Data2VecPretraining
from d2v_train.lightning.optim import OptimConfig, adamw, build_optimizer, lr_lambda, param_groups
from d2v_train.models import build_encoder

SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


def tiny_encoder(modality: str) -> torch.nn.Module:
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    if modality == "vision":
        extra = dict(
            image_size=16, patch_size=4, use_mask_token=True, use_shared_relative_position_bias=True,
            use_mean_pooling=False, drop_path_rate=0.0, layer_scale_init_value=0.1,
        )
    elif modality == "audio":
        extra = dict(
            conv_dim=[16] * 7, num_conv_pos_embeddings=1, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, mask_time_prob=0.65,
        )
    else:
        extra = dict(
            vocab_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, add_pooling_layer=False,
        )
    return build_encoder(modality, {**common, **extra})


def module_for(modality: str, **objective: Any) -> Data2VecPretraining:
    torch.manual_seed(0)
    ema = dict(decay=0.9, end_decay=0.99, anneal_steps=10)
    if modality == "vision":
        obj = dict(layer_targets="block", top_k=2, layer_norm="layer", final_norm="layer", loss_beta=2.0,
                   loss_scale=1.0, channel_reduction="mean", teacher_input="raw", ema=ema)
        mask = dict(kind="block", mask_ratio=0.6, min_num_patches=3)
    elif modality == "audio":
        obj = dict(layer_targets="ffn", top_k=2, layer_norm="instance", teacher_input="embed",
                   ema={**ema, "copy": ["pos_conv", "mask_embedding"], "share": ["feature_extractor", "feature_projection"]})
        mask = dict(kind="span", mask_prob=0.65, mask_length=5)
    else:
        obj = dict(layer_targets="ffn", top_k=2, layer_norm="layer", loss_beta=4.0, loss_scale=1.0, head="mlp",
                   teacher_input="raw", ema={**ema, "copy": ["embeddings"]})
        mask = dict(kind="token", mask_prob=0.3, mask_length=1)
    obj.update(objective)
    return Data2VecPretraining(
        tiny_encoder(modality), objective=obj, masking=mask,
        optim=dict(lr=2e-3, warmup_steps=3, weight_decay=0.01),
        special_token_ids=SPECIAL if modality == "text" else None, seed=0,
    )


def fixed_batch(modality: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    # structured signals (masked content is predictable from the visible context), not white noise
    if modality == "vision":
        coarse = torch.randn(8, 3, 2, 2, generator=g)
        return {"inputs": torch.nn.functional.interpolate(coarse, size=(16, 16)), "padding_mask": None}
    if modality == "audio":
        t = torch.arange(8000) / 16000
        freqs = 200 + 1500 * torch.rand(4, 2, 1, generator=g)
        wav = torch.sin(2 * torch.pi * freqs * t).sum(1)
        pad = torch.zeros(4, 8000, dtype=torch.bool)
        pad[2:, 6000:] = True
        return {"inputs": wav.masked_fill(pad, 0.0), "padding_mask": pad}
    ids = torch.randint(5, 64, (8, 24), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[4:, 18:] = 1
    ids[4:, 17] = 2
    return {"inputs": ids, "padding_mask": ids == 1}


class Recorder(L.Callback):
    """Snapshots the student after every optimizer update and the logged losses."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []
        self.steps_seen = 0  # global_step before the first update

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(pl_module.last_stats["loss"]))
        if trainer.global_step > self.steps_seen:
            self.steps_seen = trainer.global_step
            self.snapshots.append({k: v.detach().clone() for k, v in pl_module.student.named_parameters()})


def run(model: Data2VecPretraining, batch: dict[str, Any], steps: int, accumulate: int = 1) -> Recorder:
    rec = Recorder()
    loader = DataLoader([batch] * (steps * accumulate), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
    )
    trainer.fit(model, loader)
    return rec


def expected_teacher(model: Data2VecPretraining, init: dict[str, torch.Tensor], rec: Recorder) -> dict[str, torch.Tensor]:
    t = {k: v.clone() for k, v in init.items()}
    for step, snap in enumerate(rec.snapshots, start=1):
        d = model.ema_decay(step)
        for k in t:
            t[k] = d * t[k] + (1 - d) * snap[k]
    return t


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_modality_learns_and_teacher_is_exact_ema(modality: str) -> None:
    model = module_for(modality)
    init = {k: v.detach().clone() for k, v in model.student.named_parameters()}
    rec = run(model, fixed_batch(modality), steps=30)
    first, last = sum(rec.losses[:3]) / 3, sum(rec.losses[-5:]) / 5
    assert last < 0.75 * first, (modality, rec.losses)
    assert len(rec.snapshots) == 30
    teacher = dict(model.teacher.model.named_parameters())
    student = dict(model.student.named_parameters())
    exp = expected_teacher(model, init, rec)
    for name in model.teacher.ema_names:
        torch.testing.assert_close(teacher[name], exp[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in model.teacher.copy_names:  # copied and shared parts follow the student exactly
        torch.testing.assert_close(teacher[name], student[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(teacher[n], student[n]) for n in model.teacher.ema_names)
    assert not model.teacher.model.training and all(not p.requires_grad for p in model.teacher.parameters())


def test_ema_steps_once_per_optimizer_update_under_accumulation() -> None:
    model = module_for("vision")
    init = {k: v.detach().clone() for k, v in model.student.named_parameters()}
    rec = run(model, fixed_batch("vision"), steps=6, accumulate=3)
    assert len(rec.losses) == 18 and len(rec.snapshots) == 6
    exp = expected_teacher(model, init, rec)
    teacher = dict(model.teacher.model.named_parameters())
    for name in model.teacher.ema_names:
        torch.testing.assert_close(teacher[name], exp[name], rtol=1e-5, atol=1e-6, msg=name)


def test_audio_teacher_reads_student_cnn_features_and_text_teacher_reads_clean_ids() -> None:
    # audio: the targets equal the teacher's contextualisation of the *student's* unmasked features
    model = module_for("audio")
    batch = fixed_batch("audio")
    with torch.no_grad():
        model.student.feature_projection.proj.weight.add_(0.5)  # student CNN path now differs from the teacher's copy
    seen: dict[str, Any] = {}
    orig = model.teacher.model.contextualize

    def spy(tokens: torch.Tensor, *a: Any, **k: Any) -> Any:
        seen["tokens"] = tokens
        return orig(tokens, *a, **k)

    model.teacher.model.contextualize = spy  # type: ignore[method-assign]
    model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))
    ref, _ = model.student.embed(batch["inputs"], batch["padding_mask"])
    torch.testing.assert_close(seen["tokens"], ref.detach())
    # text: the teacher gets the unmasked ids, the student the masked ones
    model = module_for("text")
    batch = fixed_batch("text")
    calls: list[torch.Tensor] = []
    t_fwd, s_fwd = model.teacher.model.forward, model.student.forward
    model.teacher.model.forward = lambda ids, **k: (calls.append(("t", ids)), t_fwd(ids, **k))[1]  # type: ignore[method-assign]
    model.student.forward = lambda ids, **k: (calls.append(("s", ids)), s_fwd(ids, **k))[1]  # type: ignore[method-assign]
    out = model.compute_objective(batch["inputs"], batch["padding_mask"], torch.Generator().manual_seed(0))
    ids = {who: x for who, x in calls}
    assert torch.equal(ids["t"], batch["inputs"])
    assert torch.equal(ids["s"] == SPECIAL["mask"], out["mask"])  # loss exactly on <mask> positions
    assert not (out["mask"] & batch["padding_mask"]).any()


def test_same_seed_same_masks_and_gradients_only_through_masked_predictions() -> None:
    model = module_for("vision")
    batch = fixed_batch("vision")
    a = model.compute_objective(batch["inputs"], None, model.mask_generator(torch.device("cpu"), 0))
    b = model.compute_objective(batch["inputs"], None, model.mask_generator(torch.device("cpu"), 0))
    c = model.compute_objective(batch["inputs"], None, model.mask_generator(torch.device("cpu"), 1))
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask"], c["mask"])
    # gradient w.r.t. the student's final states is zero at unmasked positions
    captured: dict[str, torch.Tensor] = {}
    head_fwd = model.head.forward

    def hook(x: torch.Tensor) -> torch.Tensor:
        return head_fwd(x)

    model.head.forward = hook  # type: ignore[method-assign]
    orig = model.student.contextualize

    def ctx(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        out.last_hidden_state.retain_grad()
        captured["h"] = out.last_hidden_state
        return out

    model.student.contextualize = ctx  # type: ignore[method-assign]
    out = model.compute_objective(batch["inputs"], None, model.mask_generator(torch.device("cpu"), 0))
    out["loss"].backward()
    g = captured["h"].grad[:, 1:]  # drop CLS
    assert (g[~out["mask"]] == 0).all() and (g[out["mask"]].abs().sum(-1) > 0).all()
    assert (captured["h"].grad[:, 0] == 0).all()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_fused_adamw_updates_as_the_loop_does_and_is_off_by_default() -> None:
    """optim.fused=true takes torch's fused kernel; its updates match the per-tensor loop's (weight
    decay groups, bias correction) to float rounding; the default keeps the loop."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [build_optimizer({"net": n}, OptimConfig(lr=1e-2, weight_decay=0.1, fused=f), 10)[0] for n, f in zip(nets, (True, False))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    assert not OptimConfig().fused and OmegaConf.load(f"{config_dir()}/optim/adamw.yaml").fused is False
    start = nets[0][0].weight.detach().clone()
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (nets[0][0].weight - start).abs().min() > 1e-3  # every weight moved: the comparison is not vacuous
    counts = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)  # not floating: no fused kernel
    assert not adamw([{"params": [counts]}], OptimConfig(fused=True)).defaults["fused"]


def test_optimizer_groups_and_schedules() -> None:
    model = module_for("vision")
    cfg = OptimConfig(weight_decay=0.05)
    groups = param_groups({"student": model.student, "head": model.head}, cfg)
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    for name, p in model.student.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith("bias") or name in ("cls_token", "mask_token")
        assert (id(p) not in decay_ids) == no_decay, name
    assert all(id(p) not in decay_ids for p in model.teacher.parameters())
    cos = lr_lambda(OptimConfig(lr=1.0, warmup_steps=10, scheduler="cosine", min_lr=0.1), 110)
    assert cos(0) == pytest.approx(1 / 11) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    tri = lr_lambda(OptimConfig(lr=1.0, scheduler="tri_stage", phase_ratio=[0.1, 0.4, 0.5], final_lr_scale=0.05), 100)
    assert tri(0) == pytest.approx(0.01) and tri(10) == 1.0 and tri(49) == 1.0
    assert tri(75) == pytest.approx(0.05**0.5) and tri(100) == pytest.approx(0.05)
    poly = lr_lambda(OptimConfig(lr=1.0, scheduler="polynomial", warmup_steps=0, power=2.0, end_lr=0.0), 10)
    assert poly(5) == pytest.approx(0.25) and poly(10) == 0.0
