"""The 2.0 conv decoder and the v1 regression head computed by hand: each test here kills mutants
that the shape tests let live (a dropped GELU, a flipped residual, a relaxed config check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2v_train.models.positions import sincos_1d, sincos_2d
from d2v_train.objective.config import DecoderConfig
from d2v_train.objective.decoder import ConvDecoder, RegressionHead
from d2v_train.objective.multimask import decoder_input


def by_hand(dec: ConvDecoder, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """conv -> layer norm over channels (no affine) -> GELU per block, residual where widths match,
    then the projection (Linear, or Linear -> GELU -> Linear)."""
    b, t, _ = x.shape
    h = x.transpose(1, 2)
    if grid is not None:
        h = h.reshape(b, -1, *grid)
    for block in dec.blocks:
        conv = block[0]
        y = conv(h)
        y = F.gelu(F.layer_norm(y.movedim(1, -1), (y.shape[1],)).movedim(-1, 1))
        h = h + y if dec.residual and y.shape == h.shape else y
    h = h.reshape(b, h.shape[1], t).transpose(1, 2)
    if isinstance(dec.proj, torch.nn.Linear):
        return dec.proj(h)
    first, last = dec.proj[0], dec.proj[-1]
    return last(F.gelu(first(h)))


@pytest.mark.parametrize(
    "spatial, cfg",
    [
        (False, DecoderConfig(dim=16, kernel=3, layers=2, groups=4, residual=True, input_dropout=0.0)),
        (False, DecoderConfig(dim=16, kernel=5, layers=2, groups=1, residual=False, projection_layers=2, input_dropout=0.0)),
        (True, DecoderConfig(dim=16, kernel=3, layers=2, groups=4, residual=True, input_dropout=0.0)),
    ],
)
def test_decoder_equals_its_definition(spatial: bool, cfg: DecoderConfig) -> None:
    torch.manual_seed(0)
    dec = ConvDecoder(16, 12, cfg, spatial=spatial).eval()
    x = torch.randn(2, 12, 16)
    grid = (3, 4) if spatial else None
    torch.testing.assert_close(dec(x, grid) if spatial else dec(x), by_hand(dec, x, grid))


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("where", ["masked", "all"])
def test_decoder_adds_fixed_positions_where_asked(spatial: bool, where: str) -> None:
    """``add_positions``: the sin-cos table (1-D over the sequence, 2-D over the patch grid) is added
    to the input at the masked positions only, or everywhere; ``none`` adds nothing."""
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=16, kernel=3, layers=1, groups=4, input_dropout=0.0, add_positions=where)
    dec = ConvDecoder(16, 12, cfg, spatial=spatial).eval()
    x, grid = torch.randn(2, 12, 16), ((3, 4) if spatial else None)
    mask = torch.rand(2, 12) < 0.5
    pos = sincos_2d(16, (3, 4))[0] if spatial else sincos_1d(16, torch.arange(12))
    where_added = mask.unsqueeze(-1).float() if where == "masked" else torch.ones(2, 12, 1)
    torch.testing.assert_close(dec(x, grid, mask), by_hand(dec, x + pos * where_added, grid))
    dec.add_positions = "none"
    torch.testing.assert_close(dec(x, grid, mask), by_hand(dec, x, grid))


@pytest.mark.parametrize("spatial, width", [(False, 9), (True, 18)])
def test_decoder_positions_need_a_sincos_width(spatial: bool, width: int) -> None:
    cfg = DecoderConfig(dim=8, kernel=3, layers=1, groups=1, add_positions="all")
    with pytest.raises(ValueError, match=f"needs an encoder width divisible by {4 if spatial else 2}"):
        ConvDecoder(width, 8, cfg, spatial=spatial)


def test_masked_positions_need_the_mask() -> None:
    cfg = DecoderConfig(dim=8, kernel=3, layers=1, groups=1, add_positions="masked")
    with pytest.raises(ValueError, match="add_positions='masked' needs the mask"):
        ConvDecoder(8, 8, cfg)(torch.randn(1, 5, 8))


def test_decoder_is_one_dimensional_unless_asked() -> None:
    dec = ConvDecoder(8, 8, DecoderConfig(dim=8, kernel=3, layers=1, groups=1))
    assert isinstance(dec.blocks[0][0], torch.nn.Conv1d) and not dec.spatial


@pytest.mark.parametrize(
    "cfg, in_dim, message",
    [
        (DecoderConfig(dim=16, kernel=3, layers=1, groups=4), 18, "groups=4 must divide"),  # encoder width only
        (DecoderConfig(dim=18, kernel=3, layers=1, groups=4), 16, "groups=4 must divide"),  # decoder width only
        (DecoderConfig(dim=16, kernel=4, layers=1, groups=1), 16, "kernel must be odd"),
        (DecoderConfig(dim=16, kernel=3, layers=1, groups=1, projection_layers=3), 16, "projection_layers must be 1 or 2"),
    ],
)
def test_decoder_config_errors_name_the_field(cfg: DecoderConfig, in_dim: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConvDecoder(in_dim, 16, cfg)


def test_two_d_decoder_needs_the_right_grid() -> None:
    dec = ConvDecoder(8, 8, DecoderConfig(dim=8, kernel=3, layers=1, groups=1), spatial=True)
    x = torch.randn(1, 12, 8)
    for grid in (None, (3, 5)):
        with pytest.raises(ValueError, match="patch grid of its 12 tokens"):
            dec(x, grid)


def test_regression_head_widths_and_kinds() -> None:
    assert RegressionHead(8).kind == "linear" and isinstance(RegressionHead(8).proj, torch.nn.Linear)
    head = RegressionHead(8, "mlp", out_dim=5)
    assert head.kind == "mlp" and head(torch.randn(3, 8)).shape == (3, 5)
    assert RegressionHead(8, out_dim=5)(torch.randn(3, 8)).shape == (3, 5)
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    first, last = head.proj[0], head.proj[-1]
    torch.testing.assert_close(head(x), last(F.gelu(first(x))))
    with pytest.raises(ValueError, match="unknown head 'conv'"):
        RegressionHead(8, "conv")


def test_decoder_input_zeroes_padding_and_noises_masked_positions() -> None:
    kept = torch.randn(2, 3, 4)
    kept_index = torch.tensor([[0, 2, 4], [1, 2, 3]])
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 5] = True
    x = decoder_input(kept, kept_index, 6, noise_std=0.5, generator=torch.Generator().manual_seed(0), padding_mask=pad)
    assert torch.equal(x[0, [0, 2, 4]], kept[0]) and torch.equal(x[1, [1, 2, 3]], kept[1])
    assert torch.equal(x[1, 5], torch.zeros(4))  # padding: exactly zero
    noise = torch.cat([x[0, [1, 3, 5]], x[1, [0, 4]]])
    assert noise.abs().min() > 0 and 0.2 < noise.std() < 1.0  # N(0, 0.5) at masked positions
