"""Heads on their own: a few optimizer steps lower the loss (one head per modality), settings
resolution, padding never counting in losses, and loading a bare or other-task checkpoint as a
new task (the start of fine-tuning)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2v_train.models import (
    AudioEncoder,
    AudioEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    VisionEncoder,
    VisionEncoderConfig,
)
from d2v_train.models.heads import (
    AudioForCTC,
    AudioForFrameClassification,
    AudioForSequenceClassification,
    AudioForXVector,
    TextForSequenceClassification,
    TextForTokenClassification,
    VisionForImageClassification,
    VisionForSemanticSegmentation,
)

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def _audio_encoder(**extra) -> AudioEncoder:
    return AudioEncoder(AudioEncoderConfig(
        **SMALL, conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=1,
        conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4, hidden_dropout=0.0, activation_dropout=0.0,
        attention_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, extra=extra))


def _text_encoder(**extra) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(**SMALL, vocab_size=50, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, extra=extra))


def _vision_encoder(**fields) -> VisionEncoder:
    fields = {**SMALL, "image_size": 32, "patch_size": 8, "drop_path_rate": 0.0, **fields}
    return VisionEncoder(VisionEncoderConfig(**fields))


def _train(model: torch.nn.Module, batch: dict, steps: int = 8, lr: float = 1e-3) -> tuple[float, float]:
    """(first loss, last loss) of ``steps`` Adam steps on one fixed batch."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses[0], losses[-1]


# ------------------------------------------------------------------------------------ training

def test_audio_ctc_trains():
    torch.manual_seed(0)
    model = AudioForCTC(_audio_encoder(), vocab_size=8, final_dropout=0.0)
    waves = torch.randn(3, 2000)
    padding = torch.zeros(3, 2000, dtype=torch.bool)
    padding[2, 1500:] = True
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100], [7, 1, 7, -100]])
    first, last = _train(model, dict(inputs=waves, padding_mask=padding, labels=labels), lr=3e-3)
    assert last < 0.8 * first, (first, last)


def test_text_classification_trains():
    torch.manual_seed(0)
    model = TextForSequenceClassification(_text_encoder(), num_labels=3, classifier_dropout=0.0)
    ids = torch.randint(3, 50, (6, 10))
    padding = torch.zeros(6, 10, dtype=torch.bool)
    padding[3:, 7:] = True
    ids = ids.masked_fill(padding, 1)
    first, last = _train(model, dict(inputs=ids, padding_mask=padding, labels=torch.tensor([0, 1, 2, 0, 1, 2])),
                         steps=10, lr=3e-3)
    assert last < 0.7 * first, (first, last)


def test_vision_segmentation_trains():
    torch.manual_seed(0)
    model = VisionForSemanticSegmentation(
        _vision_encoder(num_hidden_layers=4), num_labels=3, out_indices=[2, 3, 4, 5], pool_scales=[1, 2],
        auxiliary_channels=8)
    grid = torch.randn(2, 3, 4, 4)  # one colour per patch, and labels the encoder can see
    pixels = F.interpolate(grid, scale_factor=8.0) + 0.05 * torch.randn(2, 3, 32, 32)
    labels = F.interpolate((grid[:, :1] > 0).float() + (grid[:, 1:2] > 0.5).float(), scale_factor=8.0)[:, 0].long()
    labels[:, :2] = 255
    first, last = _train(model, dict(inputs=pixels, labels=labels), steps=10, lr=3e-3)
    assert last < 0.8 * first, (first, last)


# ------------------------------------------------------------------------------------ settings

def test_settings_order_and_unknown_keys():
    encoder = _audio_encoder(vocab_size=20, final_dropout=0.3, id2label={"0": "a", "1": "b", "2": "c"})
    model = AudioForCTC(encoder, final_dropout=0.0)
    assert model.settings["vocab_size"] == 20  # from the encoder's extra (an imported config.json)
    assert model.settings["final_dropout"] == 0.0  # keyword wins
    assert model.settings["ctc_loss_reduction"] == "sum"  # transformers' default
    assert model.out_proj.out_features == 20
    frames = AudioForFrameClassification(_audio_encoder(id2label={"0": "a", "1": "b", "2": "c"}))
    assert frames.num_labels == 3 and frames.transformers_fields()["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert AudioForFrameClassification(_audio_encoder(), num_labels=5).settings["id2label"]["4"] == "LABEL_4"
    with pytest.raises(TypeError, match="unknown setting"):
        AudioForCTC(_audio_encoder(), vocab_sise=3)
    with pytest.raises(TypeError, match="needs a text encoder"):
        TextForSequenceClassification(_audio_encoder())


def test_build_head_by_task_name():
    from d2v_train.models.heads import build_head

    assert isinstance(build_head("ctc", _audio_encoder(), vocab_size=5), AudioForCTC)
    assert isinstance(build_head("Data2VecTextForTokenClassification", _text_encoder()), TextForTokenClassification)
    with pytest.raises(ValueError, match="unknown text task"):
        build_head("ctc", _text_encoder())


def test_poolers_fit_the_transformers_class():
    text = TextForSequenceClassification(_text_encoder())  # TextEncoder builds a pooler by default
    assert text.encoder.pooler is None and not text.encoder.config.add_pooling_layer
    vision = VisionForImageClassification(_vision_encoder(use_mean_pooling=True), num_labels=2)
    assert vision.encoder.pool_norm is not None
    cls_token = VisionForImageClassification(_vision_encoder(use_mean_pooling=False), num_labels=2)
    assert cls_token.encoder.pool_norm is None and cls_token.encoder.norm is not None


# ------------------------------------------------------------------------------------- padding

def test_frame_class_ids_skip_padded_frames():
    torch.manual_seed(0)
    model = AudioForFrameClassification(_audio_encoder(), num_labels=3).eval()
    waves = torch.randn(2, 2000)
    padding = torch.zeros(2, 2000, dtype=torch.bool)
    padding[1, 1000:] = True
    with torch.no_grad():
        out = model(waves, padding_mask=padding)
        labels = torch.randint(0, 3, out.logits.shape[:2])
        loss = model(waves, padding_mask=padding, labels=labels).loss
    valid = ~out.padding_mask
    assert out.padding_mask.any()
    assert torch.allclose(loss, F.cross_entropy(out.logits[valid], labels[valid]), atol=1e-6)


@pytest.mark.parametrize("head_class,too_short,long_enough", [
    (AudioForSequenceClassification, 15, 25),  # a 20-sample receptive field: 15 samples give no frame
    (AudioForXVector, 90, 400),  # 8 frames; TDNN kernels 5, 3, 3 take 8 (HF's count), the std needs 2
])
def test_utterance_pooling_names_rows_without_enough_frames(head_class, too_short, long_enough):
    """A clip too short to pool would give NaN logits (0 / 0), and one NaN row spoils the batch's loss."""
    torch.manual_seed(0)
    model = head_class(_audio_encoder(), num_labels=3, **({"tdnn_dim": [8, 8, 8], "tdnn_kernel": [5, 3, 3],
                       "tdnn_dilation": [1, 2, 3], "xvector_output_dim": 8} if head_class is AudioForXVector else {})).eval()  # fmt: skip
    waves = torch.randn(3, 2000)
    padding = torch.zeros(3, 2000, dtype=torch.bool)
    padding[2, too_short:] = True
    with pytest.raises(ValueError, match=r"batch row\(s\) \[2\]"):
        model(waves, padding_mask=padding)
    padding[2, :long_enough] = False
    assert torch.isfinite(model(waves, padding_mask=padding).logits).all()


@pytest.mark.parametrize("head_class,settings,frames", [
    (AudioForSequenceClassification, {}, 1),
    (AudioForXVector, {"tdnn_dim": [8, 8, 8], "tdnn_kernel": [5, 3, 3], "tdnn_dilation": [1, 2, 3], "xvector_output_dim": 8}, 16),
    (AudioForXVector, {"tdnn_dim": [8, 8], "tdnn_kernel": [3, 1], "tdnn_dilation": [1, 1], "xvector_output_dim": 8}, 4),
])
def test_shortest_clip_a_head_pools_runs_alone_and_one_sample_less_does_not(head_class, settings, frames):
    """``min_samples`` is what d2v-finetune raises ``data.min_sample_size`` to: a batch whose longest
    clip has that length must pool, one sample less must not reach the frames the head needs."""
    torch.manual_seed(0)
    encoder = _audio_encoder()
    shortest = head_class.min_samples(encoder, settings)
    assert head_class.min_frames({**head_class.defaults, **settings}) == frames
    assert int(encoder.output_lengths(torch.tensor([shortest]))[0]) == frames
    assert int(encoder.output_lengths(torch.tensor([shortest - 1]))[0]) == frames - 1
    model = head_class(encoder, num_labels=3, **settings).eval()
    for length in (shortest, shortest - 1):
        waves, padding = torch.randn(2, length), torch.zeros(2, length, dtype=torch.bool)
        if length == shortest:
            assert torch.isfinite(model(waves, padding_mask=padding).logits).all()
        else:
            with pytest.raises((ValueError, RuntimeError)):
                model(waves, padding_mask=padding)


def test_token_classification_ignores_padding_labels():
    torch.manual_seed(0)
    model = TextForTokenClassification(_text_encoder(), num_labels=4).eval()
    ids = torch.randint(3, 50, (2, 8))
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 5:] = True
    labels = torch.randint(0, 4, (2, 8))  # a careless collator: real labels on padding
    with torch.no_grad():
        loss = model(ids, padding_mask=padding, labels=labels).loss
        clean = model(ids, padding_mask=padding, labels=labels.masked_fill(padding, -100)).loss
    assert torch.equal(loss, clean)


def test_bf16_autocast_forward():
    model = TextForSequenceClassification(_text_encoder(), num_labels=2).eval()
    ids = torch.randint(3, 50, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=torch.tensor([0, 1]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------ interop

def test_load_bare_checkpoint_as_a_task(tmp_path):
    transformers = pytest.importorskip("transformers")
    from d2v_train.interop import load_transformers
    from d2v_train.interop.heads import load_transformers_task, save_transformers_task

    config = transformers.Data2VecTextConfig(**SMALL, vocab_size=50, max_position_embeddings=40)
    transformers.Data2VecTextModel(config).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="load_transformers"):
        load_transformers_task(tmp_path / "bare")
    model = load_transformers_task(tmp_path / "bare", architecture="Data2VecTextForSequenceClassification", num_labels=3)
    encoder = load_transformers(tmp_path / "bare")
    ours = model.encoder.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in encoder.state_dict().items() if not k.startswith("pooler."))
    assert model.encoder.pooler is None and model.num_labels == 3
    save_transformers_task(model, tmp_path / "task")
    reloaded, info = transformers.Data2VecTextForSequenceClassification.from_pretrained(
        tmp_path / "task", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_labels == 3


def test_load_bare_vision_as_mean_pooling_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    from d2v_train.interop.heads import load_transformers_task

    config = transformers.Data2VecVisionConfig(**SMALL, image_size=32, patch_size=8, use_mean_pooling=True)
    transformers.Data2VecVisionModel(config).save_pretrained(tmp_path / "bare")  # no pooler
    model = load_transformers_task(tmp_path / "bare", architecture="Data2VecVisionForImageClassification", num_labels=5)
    assert model.encoder.pool_norm is not None
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 5)
