"""Our task heads against transformers' Data2Vec* task classes built from the same random weights.

For every head: a tiny transformers model with randomised (non-zero) weights, buffers included,
is saved, loaded through ``load_transformers_task`` and run next to ours in eval mode (fp32,
padding exercised for audio and text): logits and loss must agree to 1e-5. Then ours is written
with ``save_transformers_task`` and reloaded by the transformers class, which must report no
missing, unexpected or mismatched keys and give the same logits and loss.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from d2v_train.interop.heads import load_transformers_task, save_transformers_task  # noqa: E402

TOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
AUDIO = dict(SMALL, conv_dim=[16, 24], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=2,
             conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4)
TEXT = dict(SMALL, vocab_size=61, type_vocab_size=1, max_position_embeddings=34, layer_norm_eps=1e-5)
VISION = dict(SMALL, image_size=32, patch_size=8, use_relative_position_bias=True, layer_scale_init_value=0.1)
SEGMENT = dict(VISION, num_hidden_layers=4, out_indices=[2, 3, 4, 5], pool_scales=[1, 2], auxiliary_channels=8,
               num_labels=3, semantic_loss_ignore_index=7)


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere, BatchNorm statistics included (eval mode reads them)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            centre = 1.0 if param.ndim == 1 and name.endswith("weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + centre)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)


# ---------------------------------------------------------------------------------------- inputs

def _audio_batch():
    generator = torch.Generator().manual_seed(2)
    waves = torch.randn(3, 3000, generator=generator)
    attention = torch.ones(3, 3000, dtype=torch.long)
    attention[1, 2100:] = 0
    attention[2, 1200:] = 0
    waves = waves * attention
    theirs = dict(input_values=waves, attention_mask=attention)
    ours = dict(inputs=waves, padding_mask=attention == 0)
    return theirs, ours


def _text_batch(vocab: int, pad: int, batch: int = 4, length: int = 12):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    lengths = torch.tensor([length, 9, 5, 2][:batch])
    attention = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(attention == 0, pad)
    return ids, attention


def _compare(a: torch.Tensor, b: torch.Tensor, what: str, valid: torch.Tensor | None = None) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if valid is not None:
        a, b = a[valid], b[valid]
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())  # float32 rounding grows with the values (segmentation logits reach ~100)
    assert diff <= TOL * scale, f"{what}: max abs difference {diff} (values up to {scale:.3g})"


def _run(hf_cls, config, tmp_path, hf_inputs, our_inputs, *, fields=("logits", "loss"), valid=None):
    """Load the random transformers model into ours, compare, export ours back, compare again."""
    torch.manual_seed(0)
    hf = hf_cls(config)
    _randomise(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = load_transformers_task(tmp_path / "hf").eval()
    assert ours.architecture == hf_cls.__name__
    with torch.no_grad():
        theirs = hf(**hf_inputs)
        mine = ours(**our_inputs)
    for field in fields:
        _compare(getattr(theirs, field), getattr(mine, field), field, valid if field == "logits" else None)

    save_transformers_task(ours, tmp_path / "export")
    reloaded, info = hf_cls.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reloaded.eval()
    with torch.no_grad():
        again = reloaded(**hf_inputs)
    for field in fields:
        _compare(getattr(again, field), getattr(mine, field), f"reloaded {field}", valid if field == "logits" else None)
    return ours, mine


# ----------------------------------------------------------------------------------------- audio

def _frame_valid(ours, padding: torch.Tensor, frames: int) -> torch.Tensor:
    return ~ours.encoder.frame_padding_mask(padding, frames)


@pytest.mark.parametrize("reduction,zero_inf", [("sum", False), ("mean", True)])
def test_audio_ctc(tmp_path, reduction, zero_inf):
    config = transformers.Data2VecAudioConfig(**AUDIO, vocab_size=11, ctc_loss_reduction=reduction,
                                              ctc_zero_infinity=zero_inf, pad_token_id=0)
    theirs, ours_in = _audio_batch()
    labels = torch.randint(1, 11, (3, 9), generator=torch.Generator().manual_seed(4))
    labels[1, 6:] = -100
    labels[2, 4:] = 0  # padded with the blank id, which CTC also skips
    theirs["labels"], ours_in["labels"] = labels, labels
    ours, out = _run(transformers.Data2VecAudioForCTC, config, tmp_path, theirs, ours_in, fields=("loss",))
    valid = ~out.padding_mask
    assert out.padding_mask.any() and valid[:, -1].any()
    hf = transformers.Data2VecAudioForCTC.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        _compare(hf(**theirs).logits, out.logits, "ctc logits", valid)


@pytest.mark.parametrize("weighted", [False, True])
def test_audio_sequence_classification(tmp_path, weighted):
    config = transformers.Data2VecAudioConfig(**AUDIO, num_labels=4, classifier_proj_size=12,
                                              use_weighted_layer_sum=weighted)
    theirs, ours_in = _audio_batch()
    labels = torch.tensor([0, 3, 1])
    theirs["labels"], ours_in["labels"] = labels, labels
    ours, _ = _run(transformers.Data2VecAudioForSequenceClassification, config, tmp_path, theirs, ours_in)
    assert (ours.layer_mix is not None) == weighted


def test_audio_frame_classification(tmp_path):
    config = transformers.Data2VecAudioConfig(**AUDIO, num_labels=3, use_weighted_layer_sum=True)
    theirs, ours_in = _audio_batch()
    frames = 299  # (3000 - 10) // 5 + 1 = 599, then (599 - 3) // 2 + 1
    classes = torch.randint(0, 3, (3, frames), generator=torch.Generator().manual_seed(5))
    labels = torch.nn.functional.one_hot(classes, 3).float()
    theirs["labels"], ours_in["labels"] = labels, labels
    _run(transformers.Data2VecAudioForAudioFrameClassification, config, tmp_path, theirs, ours_in)


def test_audio_xvector(tmp_path):
    config = transformers.Data2VecAudioConfig(**AUDIO, num_labels=5, tdnn_dim=[8, 8, 12], tdnn_kernel=[3, 3, 1],
                                              tdnn_dilation=[1, 2, 1], xvector_output_dim=10)
    theirs, ours_in = _audio_batch()
    labels = torch.tensor([4, 0, 2])
    theirs["labels"], ours_in["labels"] = labels, labels
    _run(transformers.Data2VecAudioForXVector, config, tmp_path, theirs, ours_in, fields=("logits", "loss", "embeddings"))


# ------------------------------------------------------------------------------------------ text

def _text_case(config, labels=None, label_key="labels", **extra_theirs):
    ids, attention = _text_batch(config.vocab_size, config.pad_token_id)
    theirs = dict(input_ids=ids, attention_mask=attention, **extra_theirs)
    ours = dict(inputs=ids, padding_mask=attention == 0)
    if labels is not None:
        theirs[label_key] = labels
        ours["labels"] = labels
    return theirs, ours, attention.bool()


def _token_labels(attention: torch.Tensor, high: int, seed: int) -> torch.Tensor:
    labels = torch.randint(0, high, attention.shape, generator=torch.Generator().manual_seed(seed))
    return labels.masked_fill(attention == 0, -100)


@pytest.mark.parametrize("tied", [True, False])
def test_text_masked_lm(tmp_path, tied):
    config = transformers.Data2VecTextConfig(**TEXT, tie_word_embeddings=tied)
    ids, attention = _text_batch(config.vocab_size, config.pad_token_id)
    labels = _token_labels(attention, config.vocab_size, 6)
    labels[:, ::2] = -100  # only some positions are "masked"
    theirs = dict(input_ids=ids, attention_mask=attention, labels=labels)
    ours_in = dict(inputs=ids, padding_mask=attention == 0, labels=labels)
    _run(transformers.Data2VecTextForMaskedLM, config, tmp_path, theirs, ours_in, valid=attention.bool())
    written = set(load_file(str(tmp_path / "export" / "model.safetensors")))
    assert ("lm_head.decoder.weight" in written) == (not tied)


def test_text_causal_lm(tmp_path):
    config = transformers.Data2VecTextConfig(**TEXT, is_decoder=True)
    ids, attention = _text_batch(config.vocab_size, config.pad_token_id)
    labels = ids.masked_fill(attention == 0, -100)
    theirs = dict(input_ids=ids, attention_mask=attention, labels=labels)
    ours_in = dict(inputs=ids, padding_mask=attention == 0, labels=labels)
    _, out = _run(transformers.Data2VecTextForCausalLM, config, tmp_path, theirs, ours_in, valid=attention.bool())
    # causal: changing a later token leaves earlier logits unchanged
    model = load_transformers_task(tmp_path / "export").eval()
    changed = ids.clone()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-6) and not torch.allclose(a[0, -1], b[0, -1])


@pytest.mark.parametrize("kind", ["regression", "single_label", "multi_label"])
def test_text_sequence_classification(tmp_path, kind):
    if kind == "regression":
        config = transformers.Data2VecTextConfig(**TEXT, num_labels=1)
        labels = torch.tensor([0.5, -1.0, 2.0, 0.1])
    elif kind == "single_label":
        config = transformers.Data2VecTextConfig(**TEXT, num_labels=3)
        labels = torch.tensor([0, 2, 1, 2])
    else:
        config = transformers.Data2VecTextConfig(**TEXT, num_labels=3, problem_type="multi_label_classification")
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    theirs, ours_in, _ = _text_case(config, labels)
    _run(transformers.Data2VecTextForSequenceClassification, config, tmp_path, theirs, ours_in)


def test_text_multiple_choice(tmp_path):
    config = transformers.Data2VecTextConfig(**TEXT)
    ids, attention = _text_batch(config.vocab_size, config.pad_token_id, batch=4)
    ids, attention = ids.view(2, 2, -1), attention.view(2, 2, -1)
    labels = torch.tensor([1, 0])
    theirs = dict(input_ids=ids, attention_mask=attention, labels=labels)
    ours_in = dict(inputs=ids, padding_mask=attention == 0, labels=labels)
    ours, _ = _run(transformers.Data2VecTextForMultipleChoice, config, tmp_path, theirs, ours_in)
    assert ours.encoder.pooler is not None


def test_text_token_classification(tmp_path):
    config = transformers.Data2VecTextConfig(**TEXT, num_labels=5)
    ids, attention = _text_batch(config.vocab_size, config.pad_token_id)
    labels = _token_labels(attention, 5, 7)
    theirs = dict(input_ids=ids, attention_mask=attention, labels=labels)
    ours_in = dict(inputs=ids, padding_mask=attention == 0, labels=labels)
    _run(transformers.Data2VecTextForTokenClassification, config, tmp_path, theirs, ours_in, valid=attention.bool())


def test_text_question_answering(tmp_path):
    config = transformers.Data2VecTextConfig(**TEXT)
    ids, attention = _text_batch(config.vocab_size, config.pad_token_id)
    start, end = torch.tensor([1, 3, 0, 40]), torch.tensor([4, 5, 2, 41])  # the last pair lies outside: ignored
    theirs = dict(input_ids=ids, attention_mask=attention, start_positions=start, end_positions=end)
    ours_in = dict(inputs=ids, padding_mask=attention == 0, start_positions=start, end_positions=end)
    _, out = _run(transformers.Data2VecTextForQuestionAnswering, config, tmp_path, theirs, ours_in,
                  fields=("start_logits", "end_logits", "loss"))
    model = load_transformers_task(tmp_path / "export").eval()
    with torch.no_grad():
        via_labels = model(ids, padding_mask=attention == 0, labels=torch.stack([start, end], dim=1)).loss
    _compare(via_labels, out.loss, "loss from (batch, 2) labels")


# ---------------------------------------------------------------------------------------- vision

@pytest.mark.parametrize("mean_pooling", [True, False])
def test_vision_image_classification(tmp_path, mean_pooling):
    config = transformers.Data2VecVisionConfig(**VISION, num_labels=4, use_mean_pooling=mean_pooling)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([3, 1])
    _run(transformers.Data2VecVisionForImageClassification, config, tmp_path,
         dict(pixel_values=pixels, labels=labels), dict(inputs=pixels, labels=labels))


@pytest.mark.parametrize("auxiliary", [False, True])
def test_vision_semantic_segmentation(tmp_path, auxiliary):
    extra = dict(use_auxiliary_head=auxiliary)
    if auxiliary:
        extra.update(auxiliary_num_convs=2, auxiliary_concat_input=True, auxiliary_loss_weight=0.3)
    config = transformers.Data2VecVisionConfig(**SEGMENT, **extra)
    generator = torch.Generator().manual_seed(9)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (2, 32, 32), generator=generator)
    labels[:, :4] = 7  # ignored rows
    ours, out = _run(transformers.Data2VecVisionForSemanticSegmentation, config, tmp_path,
                     dict(pixel_values=pixels, labels=labels), dict(inputs=pixels, labels=labels))
    assert out.logits.shape == (2, 3, 16, 16)  # 4x the 4x4 patch grid
    assert (ours.aux is not None) == auxiliary
