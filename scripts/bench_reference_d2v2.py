"""Times full data2vec 2.0 pretraining updates of the reference code (fairseq ``Data2VecMultiModel``).

Run with a Python that has the reference packages installed (NOT the project's venv; see
``scripts/make_fairseq_golden.py`` for how to set one up), e.g.:

    OMP_NUM_THREADS=1 /tmp/fsvenv/bin/python scripts/bench_reference_d2v2.py --modality audio --size base

``scripts/bench_pretrain.py --reference-python PATH`` runs it after its own variants with the same
modality, size, batch and step count and prints the row beside ours.

What one timed update does, as the reference's trainer would:
- ``model(source, id=..., precomputed_mask=...)`` in training mode: the student encodes the kept
  tokens of ``clone_batch`` masked copies of each sample, the conv decoder predicts the masked ones,
  and the EMA teacher (built by the model itself, ``make_ema_teacher`` in ``__init__``) encodes the
  full sample once; the forward also computes the reference's logged statistics (prediction and
  target variance);
- the losses summed and divided by the sample size (what fairseq's ``model`` criterion and the
  trainer's gradient scaling do), backward;
- ``torch.optim.AdamW`` step (no weight decay on 1-d tensors, biases, ALiBi scales);
- ``model.set_num_updates(n)``: the reference's hook that anneals the decay and calls
  ``EMAModule.step`` on the student.

Masks: text masks are drawn inside the forward (``random_masking``), as the recipe does. For audio
and images the recipes precompute the masks in the data loader (``precompute_mask_config``:
``compute_block_mask_1d`` / ``compute_block_mask_2d`` per sample, ``clone_batch`` rows each); here
they are drawn the same way before each update, timed apart (``mask_s``), and not counted in
``step_s``.

The model is the published base recipe's (12 x 768, its M, decoder, masking, top-K, the audio CNN)
or a tiny one shaped like ``bench_pretrain.py``'s (2 x 64), with dropout, layerdrop and drop path
off (the decoder's input dropout stays at the recipe value, as in ours). Batch: ``--batch`` samples
of ``--seconds`` of 16 kHz audio, ``--length`` tokens, or 224 x 224 images, as ``bench_pretrain.py``
builds them. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from typing import Any, Optional

import torch

VOCAB = 8000  # bench_pretrain.py's text vocabulary
TINY = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0)
BASE = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
# the base recipes (fairseq examples/data2vec/config/v2/base_{audio,text,images}_only_task.yaml)
RECIPE = {
    "audio": dict(clone_batch=8, top_k=8, loss_scale=None, norm_eps=1e-5, ema_encoder_only=False, cls_loss=0.0,
                  layer_norm_targets=False, ema=(0.999, 0.99999, 75000), optim=(7.5e-4, (0.9, 0.98), 1e-6, 0.01),
                  decoder=dict(decoder_dim=384, decoder_groups=16, decoder_kernel=7, decoder_layers=4, input_dropout=0.1)),
    "text": dict(clone_batch=8, top_k=12, loss_scale=1.0, norm_eps=1e-5, ema_encoder_only=True, cls_loss=0.0,
                 layer_norm_targets=False, ema=(0.9999, 0.99999, 100000), optim=(2e-4, (0.9, 0.98), 1e-6, 0.01),
                 decoder=dict(decoder_dim=768, decoder_groups=1, decoder_kernel=9, decoder_layers=5, input_dropout=0.1,
                              decoder_residual=False, projection_layers=2, projection_ratio=2.0)),
    "vision": dict(clone_batch=16, top_k=10, loss_scale=None, norm_eps=1e-6, ema_encoder_only=False, cls_loss=0.01,
                   layer_norm_targets=True, ema=(0.9998, 0.99999, 100000), optim=(1e-3, (0.9, 0.95), 1e-8, 0.05),
                   decoder=dict(decoder_dim=768, decoder_groups=16, decoder_kernel=3, decoder_layers=6, input_dropout=0.0)),
}
BASE_CNN = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
TINY_CNN = "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64,2,2)] + [(64,2,2)]"


def import_reference() -> types.SimpleNamespace:
    """The reference 2.0 modules, through ``make_fairseq_golden.py``'s import workarounds (Python
    >= 3.11 dataclass defaults, the removed ``np.float``, the ``examples`` top-level package)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_fairseq_golden import _import_data2vec2

    names = ("Modality", "D2vModalitiesConfig", "Data2VecMultiConfig", "Data2VecMultiModel", "D2vAudioConfig",
             "D2vImageConfig", "D2vTextConfig", "D2vDecoderConfig")
    ref = types.SimpleNamespace(**dict(zip(names, _import_data2vec2())))
    from fairseq.data import Dictionary
    from fairseq.data.data_utils import compute_block_mask_1d, compute_block_mask_2d

    ref.Dictionary, ref.compute_block_mask_1d, ref.compute_block_mask_2d = (
        Dictionary, compute_block_mask_1d, compute_block_mask_2d)
    return ref


def build_model(ref: types.SimpleNamespace, modality: str, size: str, clones: Optional[int]) -> tuple[Any, int, Any]:
    """The reference model (student, decoder, EMA teacher) for one modality; returns (model, M, dictionary)."""
    shape = BASE if size == "base" else TINY
    recipe = RECIPE[modality]
    layers = shape["depth"]
    decoder_kw = dict(recipe["decoder"])
    if size != "base":  # as bench_pretrain: the tiny decoder follows the encoder width
        decoder_kw["decoder_dim"] = shape["embed_dim"]
    decoder = ref.D2vDecoderConfig(**decoder_kw)
    # vision: the recipe splits the 12 blocks into 2 "prenet" blocks (the teacher re-embeds the image
    # through its own copy of them) and 10 main blocks (the only ones top-K averages over)
    prenet = 2 if (modality == "vision" and size == "base") else 0
    depth = layers - prenet
    common = dict(prenet_depth=prenet, prenet_dropout=0.0, prenet_layerdrop=0.0, num_alibi_heads=shape["num_heads"],
                  model_depth=depth, decoder=decoder, mask_noise_std=0.01)
    dictionary = None
    task = None
    if modality == "audio":
        mod_cfg = ref.D2vAudioConfig(
            feature_encoder_spec=BASE_CNN if size == "base" else TINY_CNN, conv_pos_depth=5, conv_pos_width=95,
            conv_pos_groups=16 if size == "base" else 4, mask_prob=0.5, mask_prob_adjust=0.05, inverse_mask=False,
            mask_length=5, mask_dropout=0.0, add_masks=False, ema_local_encoder=False, use_alibi_encoder=True,
            learned_alibi_scale=True, learned_alibi_scale_per_head=True, **common)
        kind = ref.Modality.AUDIO
    elif modality == "text":
        dictionary = ref.Dictionary()  # <s>=0 <pad>=1 </s>=2 <unk>=3, then symbols
        for i in range(VOCAB - 5):
            dictionary.add_symbol(f"w{i}")
        dictionary.add_symbol("<mask>")
        task = types.SimpleNamespace(source_dictionary=dictionary)
        mod_cfg = ref.D2vTextConfig(mask_prob=0.48, mask_length=1, dropout=0.0, max_source_positions=512, **common)
        kind = ref.Modality.TEXT
    else:
        mod_cfg = ref.D2vImageConfig(
            inverse_mask=True, mask_prob=0.8, mask_prob_adjust=0.07, mask_length=3, ema_local_encoder=True,
            num_extra_tokens=1, init_extra_token_zero=False, use_alibi_encoder=False, embed_dim=shape["embed_dim"],
            input_size=224, patch_size=16, **common)
        kind = ref.Modality.IMAGE
    modalities = ref.D2vModalitiesConfig(**{{"vision": "image"}.get(modality, modality): mod_cfg})
    m = recipe["clone_batch"] if clones is None else clones
    decay, end_decay, anneal = recipe["ema"]
    cfg = ref.Data2VecMultiConfig(
        depth=depth, num_heads=shape["num_heads"], embed_dim=shape["embed_dim"], mlp_ratio=shape["mlp_ratio"],
        norm_eps=recipe["norm_eps"], encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0,
        activation_dropout=0.0, dropout_input=0.0, layerdrop=0.0, start_drop_path_rate=0.0, end_drop_path_rate=0.0,
        average_top_k_layers=min(recipe["top_k"], depth), instance_norm_target_layer=True,
        layer_norm_targets=recipe["layer_norm_targets"], loss_beta=0.0, loss_scale=recipe["loss_scale"],
        clone_batch=m, cls_loss=recipe["cls_loss"], ema_decay=decay, ema_end_decay=end_decay,
        ema_anneal_end_step=anneal, ema_encoder_only=recipe["ema_encoder_only"], max_update=400000, seed=1,
        supported_modality=kind, modalities=modalities,
    )
    torch.manual_seed(0)
    model = ref.Data2VecMultiModel(cfg, [kind], task=task)
    if model.ema is None:
        raise SystemExit("reference model built without its EMA teacher (skip_ema): nothing to compare")
    return model, m, dictionary


def conv_frames(spec: str, samples: int) -> int:
    """Frames the audio CNN makes of ``samples`` (no padding, as ``_get_mask_indices_dims``)."""
    t = samples
    for _, k, s in eval(spec):  # the reference's own spec format: a Python list expression
        t = (t - k) // s + 1
    return t


def make_batch(modality: str, batch: int, seconds: float, length: int) -> torch.Tensor:
    """The same inputs as bench_pretrain.py's ``make_batch``."""
    g = torch.Generator().manual_seed(0)
    if modality == "audio":
        return torch.randn(batch, int(16000 * seconds), generator=g)
    if modality == "text":
        ids = torch.randint(5, VOCAB, (batch, length), generator=g)
        ids[:, 0] = 0
        return ids
    return torch.randn(batch, 3, 224, 224, generator=g)


def loader_masks(ref: types.SimpleNamespace, model: Any, modality: str, inputs: torch.Tensor, m: int) -> Optional[torch.Tensor]:
    """Masks as the recipe's data loader precomputes them (M rows per sample, samples concatenated)."""
    if modality == "text":
        return None
    mc = model.modality_encoders["AUDIO" if modality == "audio" else "IMAGE"].modality_cfg
    if modality == "audio":
        t = conv_frames(mc.feature_encoder_spec, inputs.shape[1])
        rows = [ref.compute_block_mask_1d(shape=(m, t), mask_prob=mc.mask_prob, mask_length=mc.mask_length,
                                          mask_prob_adjust=mc.mask_prob_adjust, inverse_mask=mc.inverse_mask,
                                          require_same_masks=True, mask_dropout=mc.mask_dropout)
                for _ in range(inputs.shape[0])]
    else:
        patches = (mc.input_size // mc.patch_size) ** 2
        rows = [ref.compute_block_mask_2d(shape=(m, patches), mask_prob=mc.mask_prob, mask_length=mc.mask_length,
                                          mask_prob_adjust=mc.mask_prob_adjust, inverse_mask=mc.inverse_mask,
                                          require_same_masks=True, mask_dropout=mc.mask_dropout)
                for _ in range(inputs.shape[0])]
    return torch.cat([torch.as_tensor(r) for r in rows], 0)


def optimizer(model: Any, modality: str) -> torch.optim.Optimizer:
    """AdamW with the recipe's hyper-parameters; no decay where the reference sets ``weight_decay_scale`` 0."""
    lr, betas, eps, wd = RECIPE[modality]["optim"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim == 1 or name.endswith(".bias") or "alibi_scale" in name) else decay).append(p)
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas,
                             eps=eps, weight_decay=wd)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", required=True, choices=["audio", "text", "vision"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=2, help="samples per update")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio clip length")
    parser.add_argument("--length", type=int, default=512, help="text tokens per sample")
    parser.add_argument("--clones", type=int, default=None, help="M (default: the base recipe's)")
    parser.add_argument("--steps", type=int, default=5, help="timed updates (after one warm-up update)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ref = import_reference()
    model, m, dictionary = build_model(ref, args.modality, args.size, args.clones)
    model = model.to(device).train()
    opt = optimizer(model, args.modality)
    inputs = make_batch(args.modality, args.batch, args.seconds, args.length).to(device)
    padding = inputs.eq(dictionary.pad()) if dictionary is not None else None
    ids = torch.arange(args.batch, device=device)
    teacher_before = [v.clone() for v in model.ema.fp32_params.values() if torch.is_floating_point(v)]
    stats: dict[str, Any] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(n: int, mask: Optional[torch.Tensor]) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(inputs, id=ids, padding_mask=padding, precomputed_mask=mask)
        loss = sum(v.float().sum() for v in out["losses"].values()) / out["sample_size"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.set_num_updates(n)  # the reference's EMA hook: anneal the decay, EMAModule.step
        stats.update(loss=float(loss.detach()), masked_pct=float(out["masked_pct"]), sample_size=int(out["sample_size"]))

    times, mask_times = [], []
    for n in range(args.steps + 1):  # update 1 warms up
        t = time.perf_counter()
        mask = loader_masks(ref, model, args.modality, inputs, m)
        mask = mask.to(device) if mask is not None else None
        mask_times.append(time.perf_counter() - t)
        sync()
        t = time.perf_counter()
        step(n + 1, mask)
        sync()
        times.append(time.perf_counter() - t)
    teacher_after = [v for v in model.ema.fp32_params.values() if torch.is_floating_point(v)]
    moved = any(not torch.equal(a, b.to(a.device)) for a, b in zip(teacher_after, teacher_before))
    if not moved:
        raise SystemExit("the reference's EMA teacher did not move during the timed updates")
    step_s = statistics.median(times[1:])
    extra = model.modality_encoders[next(iter(model.modality_encoders))].modality_cfg.num_extra_tokens
    masked_per_row = stats["sample_size"] / (args.batch * m)
    if args.modality == "audio":
        tokens = conv_frames(model.modality_encoders["AUDIO"].modality_cfg.feature_encoder_spec, inputs.shape[1])
    elif args.modality == "text":
        tokens = inputs.shape[1]
    else:
        tokens = (224 // 16) ** 2
    encoded = args.batch * m * (tokens - masked_per_row + extra)  # what the student encoded
    row = dict(modality=args.modality, size=args.size, variant=f"reference 2.0 M={m}", step_s=step_s,
               samples_s=args.batch / step_s, pairs_s=args.batch * m / step_s, tokens_s=encoded / step_s,
               mask_s=statistics.median(mask_times[1:]), masked_per_row=masked_per_row, masked_pct=stats["masked_pct"],
               loss=stats["loss"], teacher_moved=moved, clones=m, batch=args.batch, device=str(device), dtype=args.dtype,
               torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
