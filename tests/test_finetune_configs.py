"""Every config of configs/finetune.yaml's groups composes (Hydra compose API) and passes the schema
checks; bad overrides fail with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from d2v_train.cli import ConfigError, check_overrides, config_dir
from d2v_train.finetune import validate_config

CONFIGS = Path(config_dir())


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("finetune", overrides=list(overrides))


@pytest.mark.parametrize("head", names("head"))
def test_each_head_composes(head: str) -> None:
    cfg = composed(f"head={head}")
    validate_config(cfg)
    assert cfg.head.task and cfg.modality in ("audio", "text", "vision")


@pytest.mark.parametrize("recipe", names("recipe"))
def test_each_recipe_composes(recipe: str) -> None:
    cfg = composed(f"recipe={recipe}")
    validate_config(cfg)


@pytest.mark.parametrize("file", names("head_data"))
def test_each_head_data_pairing_composes(file: str) -> None:
    head = next(h for h in sorted(names("head"), key=len, reverse=True) if file.startswith(h + "_"))
    data = file[len(head) + 1 :]
    cfg = composed(f"head={head}", f"data={data}")
    validate_config(cfg)


def test_ctc_picks_sentences_and_transcripts() -> None:
    assert composed("head=ctc").data.kind == "sentences"
    assert composed("head=ctc", "data=audio").data.labels == "transcript"
    cfg = composed("recipe=ctc_10h")
    assert cfg.data.labels == "transcript" and cfg.finetune.freeze_encoder_steps == 10000
    assert cfg.finetune.mask_feature_prob == 0.5 and cfg.optim.lr == 5e-5 and cfg.trainer.max_steps == 20000


def test_reference_values_of_recipes() -> None:
    img = composed("recipe=image_classification")
    assert (img.finetune.layer_decay, img.encoder_overrides.drop_path_rate, img.finetune.mixup_alpha) == (0.65, 0.2, 0.8)
    assert img.optim.lr == 4e-3 and img.finetune.label_smoothing == 0.1
    glue = composed("recipe=glue")
    assert glue.optim.scheduler == "polynomial" and glue.optim.weight_decay == 0.1 and glue.optim.warmup_ratio == 0.06


def test_sweep_callback_registered() -> None:
    cfg = composed()
    node = OmegaConf.to_container(cfg.hydra.callbacks, resolve=False) if "hydra" in cfg else None
    # compose() strips the hydra node; read the file instead
    text = (CONFIGS / "finetune.yaml").read_text()
    assert "d2v_train.lightning.sweep.SweepResults" in text or node


@pytest.mark.parametrize(
    "override, expected",
    [
        (["head=nope"], "unknown option 'nope' for 'head'"),
        (["finetune.layer_decai=0.5"], "finetune.layer_decai"),
        (["optim.lr=fast"], "optim.lr"),
        (["encoder_overrides.layerdrop=0.1"], "does not apply to a vision encoder"),
        (["head.task=ctc"], "head.task"),
    ],
)
def test_bad_overrides_are_one_line(override: list[str], expected: str) -> None:
    msg = check_overrides(override, "finetune", validate_config)
    assert msg is not None and expected in msg and "\n" not in msg


def test_validate_rejects_unknown_head_setting() -> None:
    cfg = composed("+head.settings.nope=1")
    with pytest.raises(ConfigError, match="head.settings.nope"):
        validate_config(cfg)
