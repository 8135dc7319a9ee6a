"""fairseq / BEiT data2vec v1 checkpoints, laid out as the reference files describe, load exactly."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from d2v_train.interop.fairseq import load_fairseq
from d2v_train.models import build_encoder

BLOCK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def _layers(state, ours_prefix, theirs_prefix, n_layers, dim):
    """wav2vec 2.0 / fairseq transformer layer names (peers.md section c tables)."""
    out = {}
    for i in range(n_layers):
        o, t = f"{ours_prefix}.{i}", f"{theirs_prefix}.{i}"
        for p in ("weight", "bias"):
            q, k, v = state[f"{o}.attn.qkv.{p}"].split(dim)
            out.update({f"{t}.self_attn.q_proj.{p}": q, f"{t}.self_attn.k_proj.{p}": k, f"{t}.self_attn.v_proj.{p}": v,
                        f"{t}.self_attn.out_proj.{p}": state[f"{o}.attn.proj.{p}"],
                        f"{t}.self_attn_layer_norm.{p}": state[f"{o}.norm1.{p}"],
                        f"{t}.fc1.{p}": state[f"{o}.mlp.fc1.{p}"], f"{t}.fc2.{p}": state[f"{o}.mlp.fc2.{p}"],
                        f"{t}.final_layer_norm.{p}": state[f"{o}.norm2.{p}"]})
    return out


def _randomised(encoder):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return encoder.eval()


def _save(tmp_path, model_state, cfg):
    checkpoint = {"cfg": OmegaConf.create({"model": cfg, "task": {"normalize": True}}), "args": None,
                  "model": model_state, "optimizer_history": [{"num_updates": 10}], "extra_state": {"epoch": 1}}
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    return path


def test_fairseq_audio_v1(tmp_path):
    config = dict(BLOCK, conv_dim=[16, 24], conv_kernel=[10, 3], conv_stride=[5, 3], conv_bias=False,
                  num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4)
    ours = _randomised(build_encoder("audio", config))
    s = ours.state_dict()
    fs = {"mask_emb": s["mask_embedding"], "layer_norm.weight": s["feature_projection.norm.weight"],
          "layer_norm.bias": s["feature_projection.norm.bias"],
          "post_extract_proj.weight": s["feature_projection.proj.weight"],
          "post_extract_proj.bias": s["feature_projection.proj.bias"],
          "encoder.layer_norm.weight": s["norm.weight"], "encoder.layer_norm.bias": s["norm.bias"],
          "final_proj.weight": torch.zeros(32, 32), "final_proj.bias": torch.zeros(32),
          "_ema": {"encoder.layers.0.fc1.weight": torch.zeros(1)}}
    for i in range(2):
        fs[f"feature_extractor.conv_layers.{i}.0.weight"] = s[f"feature_extractor.layers.{i}.conv.weight"]
        fs[f"feature_extractor.conv_layers.{i}.2.1.weight"] = s[f"feature_extractor.layers.{i}.norm.weight"]
        fs[f"feature_extractor.conv_layers.{i}.2.1.bias"] = s[f"feature_extractor.layers.{i}.norm.bias"]
        fs[f"encoder.pos_conv.{i}.0.weight"] = s[f"pos_conv.layers.{i}.conv.weight"]
        fs[f"encoder.pos_conv.{i}.0.bias"] = s[f"pos_conv.layers.{i}.conv.bias"]
    fs.update(_layers(s, "transformer.blocks", "encoder.layers", 2, 32))
    path = _save(tmp_path, fs, {"_name": "data2vec_audio", "encoder_attention_heads": 4,
                                "conv_feature_layers": "[(16, 10, 5)] + [(24, 3, 3)] * 1"})
    loaded = load_fairseq(path).eval()
    assert loaded.config.conv_stride == [5, 3] and loaded.config.num_attention_heads == 4
    waves = torch.randn(2, 2000)
    with torch.no_grad():
        assert torch.equal(loaded(waves).last_hidden_state, ours(waves).last_hidden_state)


def test_fairseq_text_v1(tmp_path):
    config = dict(BLOCK, vocab_size=60, max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5,
                  add_pooling_layer=False)
    ours = _randomised(build_encoder("text", config))
    with torch.no_grad():
        ours.embeddings.token_type.weight.zero_()
    s = ours.state_dict()
    p = "encoder.sentence_encoder"
    fs = {f"{p}.embed_tokens.weight": s["embeddings.token.weight"],
          f"{p}.embed_positions.weight": s["embeddings.position.weight"],
          f"{p}.layernorm_embedding.weight": s["embeddings.norm.weight"],
          f"{p}.layernorm_embedding.bias": s["embeddings.norm.bias"],
          "encoder.regression_head.0.weight": torch.zeros(64, 32), "encoder.regression_head.2.weight": torch.zeros(32, 64)}
    fs.update(_layers(s, "transformer.blocks", f"{p}.layers", 2, 32))
    path = _save(tmp_path, fs, {"_name": "data2vec_text", "encoder_attention_heads": 4})
    loaded = load_fairseq(path).eval()
    ids = torch.randint(3, 60, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, ours(ids).last_hidden_state)


@pytest.mark.parametrize("shared, mean_pool", [(True, False), (False, True)])
def test_beit_vision_v1(tmp_path, shared, mean_pool):
    config = dict(BLOCK, image_size=16, patch_size=4, use_mask_token=True, layer_scale_init_value=0.1,
                  use_shared_relative_position_bias=shared, use_relative_position_bias=not shared,
                  use_mean_pooling=mean_pool, add_pooling_layer=mean_pool, layer_norm_eps=1e-6, drop_path_rate=0.0)
    ours = _randomised(build_encoder("vision", config))
    s = ours.state_dict()
    fs = {"cls_token": s["cls_token"], "mask_token": s["mask_token"],
          "patch_embed.proj.weight": s["patch_embed.proj.weight"], "patch_embed.proj.bias": s["patch_embed.proj.bias"],
          "lm_head.weight": torch.zeros(32, 32), "lm_head.bias": torch.zeros(32)}
    if shared:
        fs["rel_pos_bias.relative_position_bias_table"] = s["rel_pos_bias.table"]
        fs["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
        fs["norm.weight"], fs["norm.bias"] = s["norm.weight"], s["norm.bias"]
    else:
        fs["fc_norm.weight"], fs["fc_norm.bias"] = s["pool_norm.weight"], s["pool_norm.bias"]
    for i in range(2):
        o, t = f"transformer.blocks.{i}", f"blocks.{i}"
        fs.update({f"{t}.gamma_1": s[f"{o}.ls1"], f"{t}.gamma_2": s[f"{o}.ls2"],
                   f"{t}.attn.qkv.weight": s[f"{o}.attn.qkv.weight"], f"{t}.attn.q_bias": s[f"{o}.attn.q_bias"],
                   f"{t}.attn.v_bias": s[f"{o}.attn.v_bias"]})
        for a in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                fs[f"{t}.{a}.{p}"] = s[f"{o}.{a}.{p}"]
        if not shared:
            fs[f"{t}.attn.relative_position_bias_table"] = s[f"{o}.attn.rel_pos_bias.table"]
    path = tmp_path / "beit.pth"
    torch.save({"model": fs}, path)
    loaded = load_fairseq(path).eval()
    assert loaded.config.num_attention_heads == 4 and loaded.config.image_size == 16
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = loaded(pixels), ours(pixels)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_unknown_key_and_head_and_unsafe_pickles_are_refused(tmp_path):
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8), "blocks.0.weird": torch.zeros(1)}}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"'blocks\.0\.weird' is not in the vision key table"):
        load_fairseq(tmp_path / "a.pt")
    torch.save({"model": {"feature_extractor.conv_layers.0.0.weight": torch.zeros(1),
                          "w2v_encoder.proj.weight": torch.zeros(1)}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="fine-tuning head"):
        load_fairseq(tmp_path / "b.pt")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("true",))

    torch.save({"model": {}, "extra": Evil()}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"refused to load.*posix\.system|refused to load.*os\.system"):
        load_fairseq(tmp_path / "c.pt")
