"""Import/export failure modes: every bad directory gets an error that names the file or key."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2v_train.interop import load_transformers, save_transformers
from d2v_train.interop.files import load_weights
from d2v_train.models import build_encoder

TINY_TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                 max_position_embeddings=20, type_vocab_size=1, add_pooling_layer=True)


@pytest.fixture()
def text_dir(tmp_path):
    encoder = build_encoder("text", TINY_TEXT).eval()
    save_transformers(encoder, tmp_path / "text")
    return encoder, tmp_path / "text"


def _rewrite(directory, edit):
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_roundtrip_without_transformers(text_dir):
    encoder, directory = text_dir
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "data2vec-text" and config["architectures"] == ["Data2VecTextModel"]
    reloaded = load_transformers(directory).eval()
    ids = torch.randint(3, 50, (2, 9))
    assert torch.equal(encoder(ids).last_hidden_state, reloaded(ids).last_hidden_state)


def test_unconsumed_key_is_named(text_dir):
    _, directory = text_dir
    _rewrite(directory, lambda s: s.__setitem__("encoder.layer.0.attention.self.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"not consumed.*encoder\.layer\.0\.attention\.self\.extra\.weight"):
        load_transformers(directory)


def test_missing_key_is_named(text_dir):
    _, directory = text_dir
    _rewrite(directory, lambda s: s.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*encoder\.layer\.1\.output\.dense\.bias"):
        load_transformers(directory)


def test_shape_mismatch_is_named(text_dir):
    _, directory = text_dir
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 30
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for encoder\.layer\.0\.intermediate\.dense\.weight"):
        load_transformers(directory)


def test_head_weights_refused_unless_ignored(text_dir):
    encoder, directory = text_dir

    def add_head(state):
        for key in list(state):
            state["data2vec_text." + key] = state.pop(key)
        state["classifier.weight"] = torch.zeros(3, 16)

    _rewrite(directory, add_head)
    with pytest.raises(ValueError, match=r"task-head weights \['classifier\.weight'\].*ignore_head=True"):
        load_transformers(directory)
    loaded = load_transformers(directory, ignore_head=True).eval()
    ids = torch.randint(3, 50, (1, 5))
    assert torch.equal(loaded(ids).last_hidden_state, encoder(ids).last_hidden_state)


def test_wrong_model_type_names_file(text_dir):
    _, directory = text_dir
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'bert'"):
        load_transformers(directory)


def test_unknown_config_field_for_our_config():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden_size'\].*valid keys"):
        build_encoder("text", {"hiden_size": 8})


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_transformers(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "data2vec-text"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_transformers(tmp_path / "empty")


def test_bin_checkpoint_loads_with_weights_only(text_dir):
    encoder, directory = text_dir
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    loaded = load_transformers(directory).eval()
    ids = torch.randint(3, 50, (2, 4))
    assert torch.equal(loaded(ids).last_hidden_state, encoder(ids).last_hidden_state)


class _Payload:
    """Unpickling this would run ``os.system``; a safe loader must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    with pytest.raises(ValueError, match="refused to load"):
        load_weights(path)


def test_corrupt_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_weights(path)


def test_export_is_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous export loadable and no temporary file."""
    import d2v_train.interop.files as files

    encoder = build_encoder("vision", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=8, image_size=8, patch_size=4))
    save_transformers(encoder, tmp_path / "v")
    before = load_file(str(tmp_path / "v" / "model.safetensors"))

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(files, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_transformers(build_encoder("vision", encoder.config), tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "model.safetensors"]
    after = load_file(str(tmp_path / "v" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_native_encoder_format_roundtrip(tmp_path):
    import d2v_train
    from d2v_train.interop import save_encoder

    encoder = build_encoder("audio", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=8, conv_dim=[8], conv_kernel=[10], conv_stride=[5],
                                          num_conv_pos_embedding_groups=2, num_conv_pos_embeddings=1)).eval()
    save_encoder(encoder, tmp_path / "enc")
    loaded = d2v_train.load_encoder(tmp_path / "enc").eval()
    waves = torch.randn(1, 400)
    assert torch.equal(loaded(waves).last_hidden_state, encoder(waves).last_hidden_state)
    state = load_file(str(tmp_path / "enc" / "encoder.safetensors"))
    state["norm.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "enc" / "encoder.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.safetensors: norm\.weight has shape \(3,\)"):
        d2v_train.load_encoder(tmp_path / "enc")
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="expected 'd2v_train.encoder'"):
        d2v_train.load_encoder(tmp_path / "enc")
