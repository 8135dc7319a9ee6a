"""scripts/eval_presets.py: its few-label draws and argument checks (the pretraining runs it launches
are measurements, documented in docs/presets.md, not tests)."""

from __future__ import annotations

import numpy as np
import pytest
from scripts_loader import load_script


def test_few_label_subsets_are_balanced_and_differ_between_draws() -> None:
    script = load_script("eval_presets")
    y = np.repeat(np.arange(4), 25)
    draws = script.few_label_draws(y, 5, 7, 3)
    assert len(draws) == 3
    for idx in draws:
        assert np.bincount(y[idx], minlength=4).tolist() == [5, 5, 5, 5]
    assert len({tuple(idx) for idx in draws}) == 3
    assert np.array_equal(draws[0], script.few_label_subset(y, 5, 7))  # the one draw the script made before
    (everything,) = script.few_label_draws(y, None, 7, 3)
    assert np.array_equal(everything, np.arange(100))


def test_bad_subsets_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("eval_presets").main(["text", "--subsets", "0"])
    assert exit_info.value.code == 2
    assert "--subsets must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audio", "--lsa", "64"], "--lsa takes a dimension count >= 0 and applies to text only, got 64 for audio"),
        (["text", "--lsa", "-1"], "--lsa takes a dimension count >= 0 and applies to text only, got -1 for text"),
        (["text", "--pooling", "grid"], "--pooling must be one of mean, cls, topk, token_idf, got 'grid'"),
    ],
)
def test_bad_lsa_and_pooling_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("eval_presets").main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
