"""Times forward+backward of our encoders against transformers' Data2Vec models, same weights.

Usage:
    python scripts/bench_encoders.py                       # tiny and base sizes, CPU
    python scripts/bench_encoders.py --sizes base --device cuda --dtype bf16 --batch 8

Prints one row per (modality, size): median step time of each implementation and the ratio
(transformers / ours; above 1 means ours is faster). Both models run in train mode with dropout
off, so the work compared is the network itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

try:
    import transformers
except ImportError as err:  # pragma: no cover - benchmark needs the dev extra
    raise SystemExit("the benchmark compares against transformers: pip install -e '.[dev]'") from err

from d2v_train.interop import load_transformers

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
NO_DROPOUT = {
    "audio": dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                  feat_proj_dropout=0.0, mask_time_prob=0.0),
    "text": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vision": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
                   use_shared_relative_position_bias=True, use_mean_pooling=False),
}


def build(modality: str, size: str):
    dims = SIZES[size]
    if modality == "audio":
        extra = {} if size == "base" else dict(conv_dim=[64] * 7, num_conv_pos_embedding_groups=4)
        cfg = transformers.Data2VecAudioConfig(**dims, **extra, **NO_DROPOUT["audio"])
        return transformers.Data2VecAudioModel(cfg)
    if modality == "text":
        cfg = transformers.Data2VecTextConfig(**dims, vocab_size=8000, max_position_embeddings=514, type_vocab_size=1,
                                              **NO_DROPOUT["text"])
        return transformers.Data2VecTextModel(cfg, add_pooling_layer=False)
    cfg = transformers.Data2VecVisionConfig(**dims, image_size=224, patch_size=16, **NO_DROPOUT["vision"])
    return transformers.Data2VecVisionModel(cfg)


def make_input(modality: str, batch: int, device: torch.device):
    if modality == "audio":
        return torch.randn(batch, 16000 * 4, device=device)  # 4 s of 16 kHz audio
    if modality == "text":
        return torch.randint(3, 8000, (batch, 512), device=device)
    return torch.randn(batch, 3, 224, 224, device=device)


def time_step(model, inputs, steps: int, dtype, device) -> float:
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(inputs)
            hidden = out.last_hidden_state
        hidden.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
    parser.add_argument("--modalities", nargs="+", default=["audio", "text", "vision"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    print(f"device={device} dtype={args.dtype} batch={args.batch} torch={torch.__version__} "
          f"transformers={transformers.__version__} threads={torch.get_num_threads()}")
    print(f"{'modality':<8} {'size':<5} {'transformers s':>15} {'ours s':>10} {'ratio':>7}")
    for size in args.sizes:
        for modality in args.modalities:
            theirs = build(modality, size)
            with tempfile.TemporaryDirectory() as tmp:
                theirs.save_pretrained(Path(tmp))
                ours = load_transformers(tmp)
            theirs.to(device).train()
            ours.to(device).train()
            inputs = make_input(modality, args.batch, device)
            t_theirs = time_step(theirs, inputs, args.steps, dtype, device)
            t_ours = time_step(ours, inputs, args.steps, dtype, device)
            print(f"{modality:<8} {size:<5} {t_theirs:>15.4f} {t_ours:>10.4f} {t_theirs / t_ours:>7.2f}", flush=True)
            del theirs, ours


if __name__ == "__main__":
    main()
