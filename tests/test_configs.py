"""Every config in configs/ (except configs/data, owned by the data layer) composes, validates and
instantiates (Hydra compose API). Base/large encoders are checked down to their config dataclass
(building them would take seconds and gigabytes); tiny ones are built into a full module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from d2v_train.cli import config_dir
from d2v_train.lightning import Data2VecPretraining
from d2v_train.models import ENCODERS, build_encoder
from d2v_train.objective.config import ObjectiveConfig
from d2v_train.pretrain import validate_config

CONFIGS = Path(config_dir())
# groups shared with the fine-tuning app: only the pretraining options are checked here
SHARED = {"optim": ["adamw"], "callbacks": ["default", "none"]}


def options(group: str) -> list[str]:
    if group in SHARED:
        return SHARED[group]
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_cfg(overrides: list[str], tmp_path: Path, hydra_cfg: bool = False) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"run_dir={tmp_path}", *overrides], return_hydra_config=hydra_cfg)
    GlobalHydra.instance().clear()
    return cfg


def modality_of(group: str, option: str) -> str | None:
    for m in ("audio", "text", "vision"):
        if option.startswith(m) or option.endswith(m) or option.startswith(f"d2v1_{m}"):
            return m
    return None


@pytest.mark.parametrize("group", ["modality", "encoder", "masking", "objective", "optim"])
def test_group_options_compose_and_validate(group: str, tmp_path: Path) -> None:
    for option in options(group):
        m = option if group == "modality" else modality_of(group, option)
        overrides = [f"modality={m}"] if m and group != "modality" else []
        if group == "masking" and option.startswith("d2v2_"):  # 2.0 masks go with the 2.0 objective
            overrides.append(f"objective={option}")
        elif group == "masking" and m == "text":  # ...and BERT masks with v1 (modality=text defaults to 2.0)
            overrides.append("objective=d2v1_text")
        cfg = compose_cfg([*overrides, f"{group}={option}"], tmp_path)
        validate_config(cfg)
        enc_cls = ENCODERS[cfg.modality][1]
        enc_cls.from_dict(OmegaConf.to_container(cfg.encoder, resolve=True))  # type: ignore[arg-type]
        ObjectiveConfig.from_dict(OmegaConf.to_container(cfg.objective, resolve=True))  # type: ignore[arg-type]


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_modality_defaults_instantiate_a_full_module(modality: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"modality={modality}"], tmp_path)
    validate_config(cfg)
    assert cfg.modality == modality and cfg.objective.layer_targets in ("ffn", "block")
    enc = build_encoder(modality, OmegaConf.to_container(cfg.encoder, resolve=True))  # type: ignore[arg-type]
    special = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4} if modality == "text" else None
    model = Data2VecPretraining(
        enc,
        objective=OmegaConf.to_container(cfg.objective, resolve=True),  # type: ignore[arg-type]
        masking=OmegaConf.to_container(cfg.masking, resolve=True),  # type: ignore[arg-type]
        optim=OmegaConf.to_container(cfg.optim, resolve=True),  # type: ignore[arg-type]
        special_token_ids=special,
    )
    assert model.objective.top_k <= enc.config.num_hidden_layers
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["_target_"].startswith("d2v_train.data.")  # type: ignore[index]
    dm = instantiate(cfg.data)
    assert getattr(dm, "modality", modality) == modality


def test_experiments_compose_with_reference_values(tmp_path: Path) -> None:
    for option in options("experiment"):
        if option.startswith("d2v2_"):  # data2vec 2.0 recipes: tests/test_d2v2.py
            continue
        cfg = compose_cfg([f"experiment={option}", "data.path=/nonexistent"], tmp_path)
        validate_config(cfg)
        ENCODERS[cfg.modality][1].from_dict(OmegaConf.to_container(cfg.encoder, resolve=True))  # type: ignore[arg-type]
        # the modality file's tiny-run tweaks must not leak into a published recipe
        preset = OmegaConf.load(CONFIGS / "objective" / f"d2v1_{cfg.modality}.yaml")
        assert OmegaConf.to_container(cfg.objective) == OmegaConf.to_container(preset), option
        # the published masking, not the tiny preset's (modality=text uses masking=text_30)
        masking = OmegaConf.load(CONFIGS / "masking" / f"{'text_span' if option == 'text_base' else cfg.modality}.yaml")
        for k, v in masking.items():
            if not (option.startswith("vision") and k == "num_mask_patches"):
                assert cfg.masking[k] == v, (option, k)
        assert cfg.trainer.num_nodes * cfg.trainer.devices == 16
        instantiate(cfg.data)
    vis = compose_cfg(["experiment=vision_base_imagenet", "data.path=/x"], tmp_path)
    assert vis.masking.num_mask_patches == 120 and vis.encoder.image_size == 224
    aud = compose_cfg(["experiment=audio_base_librispeech", "data.path=/x"], tmp_path)
    assert aud.optim.scheduler == "tri_stage" and aud.trainer.max_steps == 400000
    assert aud.objective.ema.anneal_steps == 30000 and aud.masking.mask_length == 10


def test_text_preset_is_2_0_masking_60_percent_and_v1_masks_30(tmp_path: Path) -> None:
    """modality=text pretrains with data2vec 2.0 (it probed above v1 in less time, docs/presets.md),
    masking 60% of tokens at random; objective=d2v1_text brings v1 with BERT masking at 30% (chosen by
    probes); the masking=text and masking=d2v2_text options keep their published shares."""
    default = compose_cfg(["modality=text"], tmp_path)
    assert (default.objective.version, default.masking.kind, default.masking.mask_prob) == (2, "random", 0.6)
    assert default.objective == compose_cfg(["modality=text", "objective=d2v2_text"], tmp_path).objective
    v1 = compose_cfg(["modality=text", "objective=d2v1_text"], tmp_path)
    assert v1.objective.get("version", 1) == 1 and "decoder" not in v1.objective
    assert (v1.masking.kind, v1.masking.mask_prob, v1.masking.leave_unmasked_prob, v1.masking.random_token_prob) == ("token", 0.3, 0.1, 0.1)
    assert compose_cfg(["modality=text", "objective=d2v1_text", "masking=text"], tmp_path).masking.mask_prob == 0.15
    assert OmegaConf.load(CONFIGS / "masking" / "d2v2_text.yaml").mask_prob == 0.48


def test_text_preset_is_two_blocks_of_128_averaging_both(tmp_path: Path) -> None:
    """modality=text pretrains text_small (2 blocks of 128, chosen by probes over text_tiny's 4 of 64)
    and averages both blocks for its targets, v1 and 2.0."""
    for extra in ([], ["objective=d2v1_text"]):
        cfg = compose_cfg(["modality=text", *extra], tmp_path)
        assert (cfg.encoder.hidden_size, cfg.encoder.num_hidden_layers, cfg.encoder.intermediate_size) == (128, 2, 256)
        assert cfg.objective.top_k == cfg.encoder.num_hidden_layers


def test_text_2_0_small_setting_narrows_its_decoder_and_recipes_do_not(tmp_path: Path) -> None:
    """The small text 2.0 setting runs its conv decoder at an eighth of its encoder's width (cheaper,
    probes higher), at the text preset's lr 3e-3 as v1 does; the published text recipes keep the
    encoder's width, their masked shares and their learning rates."""
    small = compose_cfg(["modality=text"], tmp_path)
    assert (small.objective.decoder.dim * 8, small.optim.lr) == (small.encoder.hidden_size, 3e-3)
    assert compose_cfg(["modality=text", "objective=d2v1_text"], tmp_path).optim.lr == 3e-3
    for recipe, mask_prob, lr in (("d2v2_text_base", 0.48, 2e-4), ("d2v2_text_large", 0.5, 1e-4)):
        cfg = compose_cfg([f"experiment={recipe}", "data.path=/nonexistent"], tmp_path)
        assert (cfg.objective.decoder.dim, cfg.masking.mask_prob, cfg.optim.lr) == (768, mask_prob, lr)


def test_text_2_0_small_setting_regresses_block_outputs_and_recipes_keep_ffn(tmp_path: Path) -> None:
    """The small text 2.0 setting takes each teacher block's output as its target layer (probed 7-13
    points higher at 10 labels per class, docs/presets.md); v1 text and the published 2.0 text recipes
    keep the reference's FFN outputs."""
    assert compose_cfg(["modality=text"], tmp_path).objective.layer_targets == "block"
    assert compose_cfg(["modality=text", "objective=d2v1_text"], tmp_path).objective.layer_targets == "ffn"
    for recipe in ("d2v2_text_base", "d2v2_text_large"):
        cfg = compose_cfg([f"experiment={recipe}", "data.path=/nonexistent"], tmp_path)
        assert cfg.objective.layer_targets == "ffn", recipe


def test_text_preset_teacher_stops_after_its_ramp_and_2_0_keeps_its_own(tmp_path: Path) -> None:
    """modality=text objective=d2v1_text's teacher ramps 0.999 -> 0.99999 over 300 updates (chosen
    by probes); the published v1 text objective keeps 0.9999, and the 2.0 text setting (the
    modality's default) its own schedule."""
    ema = compose_cfg(["modality=text", "objective=d2v1_text"], tmp_path).objective.ema
    assert (ema.decay, ema.end_decay, ema.anneal_steps) == (0.999, 0.99999, 300)
    assert OmegaConf.load(CONFIGS / "objective" / "d2v1_text.yaml").ema.end_decay == 0.9999
    v2 = compose_cfg(["modality=text"], tmp_path).objective.ema
    assert (v2.decay, v2.end_decay) == (0.999, 0.9999)


def test_digits_augmentation_per_objective(tmp_path: Path) -> None:
    """configs/objective_data/: v1 and 2.0 pretraining on the bundled digits run without shift / scale
    augmentation (both probe better so), fine-tuning keeps data/digits.yaml's 0.1, and a user's image
    folder (another data module, which has no such fields) is not touched."""
    def augmentation(*overrides: str) -> tuple:
        data = compose_cfg(list(overrides), tmp_path).data
        return data.get("max_shift"), data.get("max_scale")

    assert augmentation() == augmentation("modality=vision", "objective=d2v1_vision") == (0.0, 0.0)
    assert augmentation("objective=d2v2_vision") == (0.0, 0.0)
    digits = OmegaConf.load(CONFIGS / "data" / "digits.yaml")
    assert (digits.max_shift, digits.max_scale) == (0.1, 0.1)  # what d2v-finetune data=digits gets
    assert augmentation("data=image", "data.path=images") == (None, None)
    for pairing in options("objective_data"):  # each file names an objective and a data config that exist
        objective, data = next((o, pairing[len(o) + 1 :]) for o in options("objective") if pairing.startswith(o + "_"))
        assert (CONFIGS / "data" / f"{data}.yaml").is_file(), pairing
        validate_config(compose_cfg([f"objective={objective}", f"data={data}"], tmp_path))


def test_digits_v1_pretraining_runs_small_batches(tmp_path: Path) -> None:
    """v1 pretraining on the bundled digits (the default command) runs 2,400 updates of 32 images, the
    same passes over the data as 1,200 of 64 (it probed higher so, docs/presets.md);
    2.0 on digits, a user's image folder under modality=vision and fine-tuning keep their own values."""
    def run_length(*overrides: str) -> tuple:
        cfg = compose_cfg(list(overrides), tmp_path)
        return cfg.data.batch_size, cfg.trainer.max_steps

    assert run_length() == run_length("modality=vision") == (32, 2400)
    assert run_length("data.batch_size=64", "trainer.max_steps=1200") == (64, 1200)  # the command line wins
    assert run_length("objective=d2v2_vision") == (64, 800)
    assert run_length("data=image", "data.path=images") == (64, 1200)
    assert OmegaConf.load(CONFIGS / "data" / "digits.yaml").batch_size == 64  # what d2v-finetune data=digits gets


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_configs_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"trainer={option}"], tmp_path)
    validate_config(cfg)
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    if kwargs["accelerator"] == "gpu":  # no GPU here: same arguments on CPU
        kwargs.update(accelerator="cpu", devices=1)
        if kwargs["precision"] == "16-mixed":
            kwargs["precision"] = "bf16-mixed"
    if "spawn" in str(kwargs["strategy"]):
        kwargs["devices"] = 1
    L.Trainer(**kwargs, logger=False, enable_checkpointing=False)


def test_loggers_callbacks_and_launcher(tmp_path: Path) -> None:
    for option in options("logger"):
        cfg = compose_cfg([f"logger={option}"], tmp_path)
        loggers = [instantiate(v) for v in cfg.logger.values()]
        assert type(loggers[0]).__name__ == "RunCSVLogger"  # metrics.csv always
    for option in options("callbacks"):
        cfg = compose_cfg([f"callbacks={option}"], tmp_path)
        [instantiate(v) for v in cfg.callbacks.values() if v is not None]
    cfg = compose_cfg(["hydra/launcher=submitit_slurm"], tmp_path, hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node and launcher.max_num_timeout > 0


def flat_items(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in flat_items(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


@pytest.mark.parametrize("option", options("modality_objective"))
def test_modality_objective_settings_win_over_the_objective_defaults(option: str, tmp_path: Path) -> None:
    """`modality=M objective=O` applies configs/modality_objective/O.yaml last: its small-scale values
    (e.g. fewer clones for a CPU run of 2.0) beat both the objective's reference values and the
    modality file's, and a published recipe (experiment=) still overrides them."""
    modality = modality_of("objective", option)
    cfg = compose_cfg([f"modality={modality}", f"objective={option}"], tmp_path)
    validate_config(cfg)
    small = OmegaConf.to_container(OmegaConf.load(CONFIGS / "modality_objective" / f"{option}.yaml"))
    items = flat_items(small)
    assert items, option
    for key, value in items:
        assert OmegaConf.select(cfg, key) == value, (option, key)
    # the published recipes of this objective set every one of those keys themselves, so no
    # small-scale value leaks into them
    recipes = [r for r in options("experiment") if r.startswith(f"{option}_")]
    assert recipes, option
    for recipe in recipes:
        own = OmegaConf.load(CONFIGS / "experiment" / f"{recipe}.yaml")
        missing = [key for key, _ in items if OmegaConf.select(own, key, default="<unset>") == "<unset>"]
        assert not missing, (recipe, missing)
