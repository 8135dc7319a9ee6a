"""ObjectiveConfig validation at its boundaries: every bad value is refused with the field named,
every edge of the valid range is accepted (mutation testing found these unguarded)."""

from __future__ import annotations

from typing import Any

import pytest

from d2v_train.objective.config import ObjectiveConfig


def build(**values: Any) -> ObjectiveConfig:
    return ObjectiveConfig.from_dict(values)


@pytest.mark.parametrize("key, valid", [("layer_norm", ["instance", "layer", "batch", "none"]),
                                        ("final_norm", ["instance", "layer", "batch", "none"])])  # fmt: skip
def test_norm_choices(key: str, valid: list[str]) -> None:
    for value in valid:
        assert getattr(build(**{key: value}), key) == value
    with pytest.raises(ValueError, match=f"bad value for 'objective.{key}': 'rms'; valid choices: {', '.join(valid)}"):
        build(**{key: "rms"})


@pytest.mark.parametrize("decoder", [dict(layers=0), dict(dim=1), dict(mask_noise_std=0.0)])
def test_decoder_edges_are_accepted(decoder: dict[str, Any]) -> None:
    build(version=2, decoder=decoder)


@pytest.mark.parametrize("decoder", [dict(layers=-1), dict(dim=0), dict(mask_noise_std=-0.01)])
def test_decoder_values_out_of_range_are_refused(decoder: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="objective.decoder: layers must be >= 0, dim >= 1 and mask_noise_std >= 0"):
        build(version=2, decoder=decoder)


def test_decoder_positions_are_named_choices() -> None:
    for where in ("none", "masked", "all"):
        assert build(version=2, decoder=dict(add_positions=where)).decoder.add_positions == where
    with pytest.raises(ValueError, match="add_positions must be none, masked or all, got 'learned'"):
        build(version=2, decoder=dict(add_positions="learned"))


@pytest.mark.parametrize("ema", [dict(decay=0.0), dict(decay=1.0, end_decay=1.0), dict(end_decay=0.0, decay=0.0),
                                 dict(anneal_fraction=1.0), dict(max_horizon=1.0), dict(max_horizon=0.01)])  # fmt: skip
def test_ema_edges_are_accepted(ema: dict[str, Any]) -> None:
    build(ema=ema)


@pytest.mark.parametrize("ema, message", [
    (dict(decay=1.5), "decay and end_decay must lie in \\[0, 1\\]"),
    (dict(decay=-0.1), "decay and end_decay must lie in \\[0, 1\\]"),
    (dict(end_decay=1.01), "decay and end_decay must lie in \\[0, 1\\]"),
    (dict(anneal_fraction=0.0), "objective.ema.anneal_fraction must lie in \\(0, 1\\]"),
    (dict(max_horizon=1.5), "objective.ema.max_horizon must lie in \\(0, 1\\]"),
])  # fmt: skip
def test_ema_values_out_of_range_are_refused(ema: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(ema=ema)
