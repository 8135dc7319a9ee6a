"""Golden check of the fairseq import against the reference code itself.

``tests/fixtures/fairseq/`` holds tiny data2vec v1 audio and text models built and run by fairseq,
and a BEiT-layout vision model built and run by timm (``scripts/make_fairseq_golden.py``, in a
separate venv with ``fairseq-fixed`` and ``timm``): their checkpoints
and the reference encoder's output on a fixed input. Our importer must reproduce that output,
which checks the key map, the inferred config and the layer maths against the reference, not
against our own inverse map.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2v_train.interop.fairseq import load_fairseq

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fairseq"


@pytest.mark.parametrize("modality", ["audio", "text", "vision"])
def test_reference_checkpoint_reproduces_reference_output(modality: str) -> None:
    encoder = load_fairseq(FIXTURES / f"{modality}.pt")
    assert encoder.modality == modality
    io = torch.load(FIXTURES / f"{modality}_io.pt", weights_only=True)
    with torch.no_grad():
        out = encoder(io["inputs"], padding_mask=io.get("padding_mask"))
    expected = io["last_hidden_state"]
    if modality == "text":  # fairseq returns T x B x C features as B x T x C; padded rows are don't-care
        valid = ~io["padding_mask"]
        torch.testing.assert_close(out.last_hidden_state[valid], expected[valid], rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.1  # a real signal, not all zeros
