"""Times one full pretraining update (student, teacher, head or decoder, loss, backward, optimizer,
EMA) for data2vec v1 and 2.0, ours and a naive transformers loop, on the same model size and batch.

Usage:
    python scripts/bench_pretrain.py                                   # tiny and base, CPU, fp32
    python scripts/bench_pretrain.py --sizes base --modalities audio --steps 5
    python scripts/bench_pretrain.py --device cuda --dtype bf16 --compile   # GPU, bf16, torch.compile

Variants, interleaved step by step so machine drift hits all alike:
- ``ours v1``: ``Data2VecPretraining`` with the v1 objective and masking of the modality;
- ``ours 2.0 M=1`` and ``ours 2.0 M=<preset>``: the 2.0 objective (visible-only student, conv
  decoder, multi-mask; the base recipe's decoder and M) on the 2.0 encoder variant;
- ``naive v1``: transformers' Data2Vec model as student (masked through its own mask arguments), a
  deep-copied teacher run with ``output_hidden_states``, top-K average of its normalised hidden
  states, the v1 loss on masked positions, AdamW, and a per-parameter EMA loop.

Per variant it prints the median update time, samples/s, (sample x mask) pairs/s, tokens the
student encoded per second, the step's peak memory (CUDA: allocator peak; CPU: growth of the
process's resident peak during the step, via /proc/self/clear_refs, so memory reused from an
earlier variant is not counted), and achieved FLOP/s (FLOPs counted by torch's FlopCounterMode for
one update) as a fraction of a matmul peak measured here. Dropouts, layerdrop and drop path are off
in every variant, so the work compared is the network and the objective.

``--reference-python PATH`` also times the reference data2vec 2.0 code (fairseq
``Data2VecMultiModel``): after our variants of each modality and size it runs
``scripts/bench_reference_d2v2.py`` with that interpreter (a separate environment that has fairseq;
its torch may differ from ours, both versions are printed) on the same batch, M, step count and
thread count, prints its row under ours (no memory or FLOP columns) and the ratio of our 2.0 at
the preset M to it in (sample x mask) pairs/s. It runs in its own process, after ours, so it is not
interleaved with our variants; its masks for audio and images are drawn outside the timed update,
as the reference's data loader draws them (the time is printed apart).

``--profile DIR`` runs one more update of each variant, after the timed ones, under
``torch.profiler`` and writes to DIR, per variant, a table of the ops that took the most time (on
the device when there is one; ``vision_base_ours_v1.txt``, say) and a Chrome trace beside it. On a
GPU it prints the update's wall time against the time the device was busy, the kernels launched
and the host syncs and copies: an update whose device sits idle most of its wall time is bound by
launches or syncs, not by its arithmetic, and faster matmuls will not speed it up.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from d2v_train.cli import config_dir
from d2v_train.lightning.optim import OptimConfig, build_optimizer
from d2v_train.lightning.pretrain import Data2VecPretraining
from d2v_train.models import build_encoder
from d2v_train.objective.masking import MaskingConfig, compute_mask, span_mask

CONFIGS = Path(config_dir())
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "base": {},
}
EXPERIMENT = {"audio": "d2v2_audio_base_librispeech", "text": "d2v2_text_base", "vision": "d2v2_vision_base_imagenet"}
NO_DROPOUT = {
    "audio": dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, layerdrop=0.0, feat_proj_dropout=0.0),
    "text": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vision": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0),
}
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
VOCAB = 8000


def _yaml(*parts: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS.joinpath(*parts)), resolve=False)  # type: ignore[return-value]


def encoder_config(modality: str, size: str, version: int) -> dict[str, Any]:
    """The base encoder yaml (2.0: with the objective's switches, or the 2.0 ViT-B), tiny: shrunk."""
    name = "vision_base_v2" if (modality == "vision" and version == 2) else f"{modality}_base"
    cfg = _yaml("encoder", f"{name}.yaml")
    if version == 2:
        cfg.update(_yaml("objective", f"d2v2_{modality}.yaml").get("encoder", {}))
        if modality == "audio":
            cfg["mask_time_prob"] = 0.0
    cfg.update(SIZES[size], **NO_DROPOUT[modality])
    if size == "tiny" and modality == "audio":
        cfg.update(conv_dim=[64] * 7, num_conv_pos_embedding_groups=4)
    if modality == "text":
        cfg.update(vocab_size=VOCAB)
    return cfg


def objective_and_masking(modality: str, version: int, layers: int, hidden: int, clones: Optional[int]) -> tuple[dict, dict]:
    if version == 1:
        obj, mask = _yaml("objective", f"d2v1_{modality}.yaml"), _yaml("masking", f"{modality}.yaml")
        if modality == "text":  # the reference yaml's span masking (all selected tokens -> <mask>)
            mask = _yaml("masking", "text_span.yaml")
    else:
        preset, exp = _yaml("objective", f"d2v2_{modality}.yaml"), _yaml("experiment", f"{EXPERIMENT[modality]}.yaml")
        obj = OmegaConf.to_container(OmegaConf.merge(preset["objective"], exp.get("objective", {})))
        mask = OmegaConf.to_container(OmegaConf.merge(_yaml("masking", f"d2v2_{modality}.yaml"), exp.get("masking", {})))
        if layers < 12:  # tiny: the decoder follows the encoder width
            obj["decoder"]["dim"] = hidden
        if clones is not None:
            obj["clones"] = clones
    obj["top_k"] = min(int(obj["top_k"]), layers)
    return obj, mask  # type: ignore[return-value]


def make_batch(modality: str, batch: int, seconds: float, length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if modality == "audio":
        return torch.randn(batch, int(16000 * seconds), generator=g).to(device)
    if modality == "text":
        ids = torch.randint(5, VOCAB, (batch, length), generator=g)
        ids[:, 0] = 0
        return ids.to(device)
    return torch.randn(batch, 3, 224, 224, generator=g).to(device)


# ----------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    step: Callable[[int], int]  # runs one update, returns the tokens the student encoded
    pairs: int
    times: list[float] = field(default_factory=list)
    encoded: int = 0
    flops: float = float("nan")
    peak_mb: float = float("nan")


def ours(modality: str, size: str, version: int, inputs: torch.Tensor, clones: Optional[int], args: Any) -> tuple[Variant, Data2VecPretraining]:
    torch.manual_seed(0)
    enc_cfg = encoder_config(modality, size, version)
    encoder = build_encoder(modality, enc_cfg)
    obj, mask = objective_and_masking(modality, version, encoder.config.num_hidden_layers, encoder.config.hidden_size, clones)
    module = Data2VecPretraining(
        encoder, objective=obj, masking=mask, special_token_ids=SPECIAL if modality == "text" else None,
        vocab_size=VOCAB if modality == "text" else None, compile=args.compile,  # the `compile=true` switch
    ).to(args.device)
    module.train()
    opt, _ = build_optimizer({"student": module.student, "head": module.head}, OptimConfig(), 1000)
    m = int(obj.get("clones", 1)) if version == 2 else 1

    def step(i: int) -> int:
        gen = torch.Generator(device=inputs.device).manual_seed(i)
        with torch.autocast(args.device.type, dtype=args.torch_dtype, enabled=args.torch_dtype != torch.float32):
            out = module.compute_objective(inputs, None, gen)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.teacher.step(module.student, 0.999)
        if version == 2:
            return int(out["encoded"])
        return int(out["mask"].numel()) + inputs.shape[0] * module.num_prefix

    label = f"ours v1" if version == 1 else f"ours 2.0 M={m}"
    return Variant(label, step, inputs.shape[0] * m), module


def naive_transformers(modality: str, reference: Data2VecPretraining, inputs: torch.Tensor, args: Any) -> Variant:
    """v1 written only with transformers' Data2Vec models (same weights as ``reference.student``)."""
    import transformers

    from d2v_train.interop import save_transformers

    cls = {"audio": transformers.Data2VecAudioModel, "text": transformers.Data2VecTextModel,
           "vision": transformers.Data2VecVisionModel}[modality]
    with tempfile.TemporaryDirectory() as tmp:
        save_transformers(reference.student, tmp)
        student = cls.from_pretrained(tmp).to(args.device).train()
    if args.compile:
        student = torch.compile(student)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    obj = reference.objective
    dim = student.config.hidden_size
    head = copy.deepcopy(reference.head).to(args.device)
    opt = torch.optim.AdamW(list(student.parameters()) + list(head.parameters()), lr=5e-4)
    masking = reference.masking

    def step(i: int) -> int:
        gen = torch.Generator(device=inputs.device).manual_seed(i)
        with torch.autocast(args.device.type, dtype=args.torch_dtype, enabled=args.torch_dtype != torch.float32):
            if modality == "audio":
                frames = int(reference.student.output_lengths(torch.tensor(inputs.shape[1])))
                mask = span_mask((inputs.shape[0], frames), masking.mask_prob, masking.mask_length, generator=gen,
                                 device=inputs.device)
                x = student(inputs, mask_time_indices=mask).last_hidden_state
                with torch.no_grad():
                    hidden = teacher(inputs, output_hidden_states=True).hidden_states
                layers = [F.instance_norm(h.float().transpose(1, 2)).transpose(1, 2) for h in hidden[-obj.top_k:]]
            elif modality == "text":
                sel = torch.rand(inputs.shape, generator=gen, device=inputs.device) < masking.mask_prob
                sel[:, 0] = False
                mask = sel
                x = student(inputs.masked_fill(mask, SPECIAL["mask"])).last_hidden_state
                with torch.no_grad():
                    hidden = teacher(inputs, output_hidden_states=True).hidden_states
                layers = [F.layer_norm(h.float(), (dim,)) for h in hidden[-obj.top_k:]]
            else:
                grid = reference.student.config.grid_size
                mask = compute_mask(masking, (inputs.shape[0], grid[0] * grid[1]), grid=grid, generator=gen,
                                    device=inputs.device)
                x = student(inputs, bool_masked_pos=mask).last_hidden_state[:, 1:]
                with torch.no_grad():
                    hidden = teacher(inputs, output_hidden_states=True).hidden_states
                layers = [F.layer_norm(h[:, 1:].float(), (dim,)) for h in hidden[-obj.top_k:]]
            target = sum(layers) / len(layers)
            if obj.final_norm == "layer":
                target = F.layer_norm(target, (dim,))
            pred = head(x[mask]).float()
            if obj.loss_beta == 0:
                loss = (pred - target[mask]).pow(2).sum(-1).mean() / math.sqrt(dim)
            else:
                per = F.smooth_l1_loss(pred, target[mask], beta=obj.loss_beta, reduction="none")
                loss = (per.mean(-1) if obj.channel_reduction == "mean" else per.sum(-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the naive EMA: one parameter at a time
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(0.999).add_(ps.detach(), alpha=0.001)
        prefix = 1 if modality == "vision" else 0
        return int(mask.numel()) + inputs.shape[0] * prefix

    return Variant("naive v1 (transformers)", step, inputs.shape[0])


# ----------------------------------------------------------------------------------------- measuring


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this device (best of a few)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kb(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(variant: Variant, device: torch.device) -> float:
    """Peak memory of one update: CUDA allocator peak above the start; CPU resident-set peak growth."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        variant.step(10_000)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    libc = _glibc()
    if libc is not None:  # large blocks straight from / back to the OS, so the RSS follows live tensors
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = _rss_kb("VmRSS")
        variant.step(10_000)
        peak = _rss_kb("VmHWM")
    except OSError:
        start = peak = None
    finally:
        if libc is not None:  # back to heap reuse for the timed steps
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            libc.malloc_trim(0)
    return float("nan") if start is None or peak is None else (peak - start) / 1024


_M_MMAP_THRESHOLD = -3


def _glibc() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def count_flops(variant: Variant) -> float:
    # eagerly under --compile: the count is the same network's, and a dispatch mode inside compiled code
    # would only add a recompile
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        variant.step(20_000)
    return float(counter.get_total_flops())


def profile_update(variant: Variant, label: str, args: Any) -> str:
    """Profiles one update; writes the op table and a trace to ``args.profile``; returns a summary line."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = args.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    _sync(args.device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        variant.step(30_000)
        _sync(args.device)
        wall = time.perf_counter() - t
    averages = prof.key_averages()
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")
    (out / f"{stem}.txt").write_text(averages.table(sort_by=sort_key, row_limit=40, max_name_column_width=60))
    prof.export_chrome_trace(str(out / f"{stem}.trace.json"))
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    busy = sum(getattr(e, "self_device_time_total", 0.0) for e in averages if e.device_type.name == "CUDA") / 1e6
    line = f"  profile {label}: wall {wall:.4f} s"
    if on_gpu:
        line += f", device busy {busy:.4f} s ({busy / wall:.0%}), {launches} kernel launches, {syncs} syncs/copies"
    return line + f" -> {out / stem}.txt"


def bench(modality: str, size: str, args: Any) -> list[Variant]:
    inputs = make_batch(modality, args.batch, args.seconds, args.length, args.device)
    v1, ref = ours(modality, size, 1, inputs, None, args)
    v2_1, _ = ours(modality, size, 2, inputs, 1, args)
    v2_m, _ = ours(modality, size, 2, inputs, args.clones, args)
    variants = [v1, v2_1, v2_m]
    if not args.no_naive:
        variants.append(naive_transformers(modality, ref, inputs, args))
    for v in variants:  # warm-up, FLOPs and memory outside the timed steps
        v.step(0)
        v.flops = count_flops(v)
        v.peak_mb = peak_memory_mb(v, args.device)
    for i in range(args.steps):  # interleaved
        for v in variants:
            _sync(args.device)
            t = time.perf_counter()
            v.encoded = v.step(i + 1)
            _sync(args.device)
            v.times.append(time.perf_counter() - t)
    if args.profile is not None:
        for v in variants:
            print(profile_update(v, f"{modality}-{size}-{v.name}", args), flush=True)
    return variants


REFERENCE_SCRIPT = Path(__file__).resolve().parent / "bench_reference_d2v2.py"


def reference_row(modality: str, size: str, args: Any) -> dict[str, Any]:
    """Runs the reference 2.0 benchmark in ``args.reference_python`` and returns its JSON row."""
    cmd = [args.reference_python, str(REFERENCE_SCRIPT), "--modality", modality, "--size", size,
           "--batch", str(args.batch), "--seconds", str(args.seconds), "--length", str(args.length),
           "--steps", str(args.steps), "--threads", str(torch.get_num_threads()), "--device", args.device.type,
           "--dtype", args.dtype]
    if args.clones is not None:
        cmd += ["--clones", str(args.clones)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the reference venv imports nothing of ours
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"--reference-python {args.reference_python}: {REFERENCE_SCRIPT.name} failed for "
                         f"{modality} {size} (exit {proc.returncode}): {tail}")
    row = json.loads(lines[-1])
    row.update(peak_mb=float("nan"), flops_s=float("nan"), frac_peak=float("nan"))
    return row


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
    parser.add_argument("--modalities", nargs="+", default=["audio", "text", "vision"])
    parser.add_argument("--batch", type=int, default=2, help="samples per update")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio clip length")
    parser.add_argument("--length", type=int, default=512, help="text tokens per sample")
    parser.add_argument("--clones", type=int, default=None, help="2.0 M (default: the base recipe's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer stacks (student, teacher) and decoder / head, as compile=true")
    parser.add_argument("--no-naive", action="store_true", help="skip the transformers loop")
    parser.add_argument("--reference-python", default=None, metavar="PATH",
                        help="a Python with fairseq: also time the reference data2vec 2.0 code (see above)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile one update per variant; op tables and traces go to DIR (see above)")
    args = parser.parse_args(argv)
    if args.reference_python is not None and not os.access(args.reference_python, os.X_OK):
        parser.error(f"--reference-python {args.reference_python}: not an executable file")
    args.device = torch.device(args.device)
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    peak = matmul_peak(args.device, args.torch_dtype)
    print(f"device={args.device} dtype={args.dtype} compile={args.compile} batch={args.batch} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} load={os.getloadavg()[0]:.1f} matmul peak={peak / 1e9:.1f} GFLOP/s", flush=True)
    header = (f"{'modality':<7} {'size':<5} {'variant':<24} {'step s':>8} {'samples/s':>10} {'pairs/s':>9} "
              f"{'tokens/s':>10} {'peak MB':>9} {'GFLOP/s':>9} {'of peak':>8}")
    print(header)
    rows = []
    for size in args.sizes:
        for modality in args.modalities:
            variants = bench(modality, size, args)
            # the peak again after each modality (best of all): a shared machine depresses single readings
            peak = max(peak, matmul_peak(args.device, args.torch_dtype))
            for v in variants:
                t = statistics.median(v.times)
                row = dict(modality=modality, size=size, variant=v.name, step_s=t, samples_s=args.batch / t,
                           pairs_s=v.pairs / t, tokens_s=v.encoded / t, peak_mb=v.peak_mb,
                           flops_s=v.flops / t, frac_peak=v.flops / t / peak)
                rows.append(row)
                print(f"{modality:<7} {size:<5} {v.name:<24} {t:>8.4f} {row['samples_s']:>10.2f} {row['pairs_s']:>9.2f} "
                      f"{row['tokens_s']:>10.0f} {v.peak_mb:>9.1f} {row['flops_s'] / 1e9:>9.1f} {row['frac_peak']:>8.1%}",
                      flush=True)
            base = {r["variant"]: r for r in rows if r["modality"] == modality and r["size"] == size}
            v1 = base["ours v1"]
            m_name = [n for n in base if n.startswith("ours 2.0") and not n.endswith("M=1")][0]
            line = (f"  -> {modality} {size} (matmul peak so far {peak / 1e9:.1f} GFLOP/s): "
                    f"2.0 ({m_name[5:]}) / v1 pairs/s = {base[m_name]['pairs_s'] / v1['pairs_s']:.2f}x")
            naive = base.get("naive v1 (transformers)")
            if naive is not None:
                line += f"; ours v1 / naive v1 = {v1['samples_s'] / naive['samples_s']:.2f}x"
                line += f"; peak MB 2.0 M=1 / naive = {base['ours 2.0 M=1']['peak_mb'] / max(naive['peak_mb'], 1e-9):.2f}"
            print(line, flush=True)
            del variants  # free this pair of models before the next one is built
            if args.reference_python is not None:
                gc.collect()
                ref = reference_row(modality, size, args)
                rows.append(ref)
                print(f"{modality:<7} {size:<5} {ref['variant']:<24} {ref['step_s']:>8.4f} {ref['samples_s']:>10.2f} "
                      f"{ref['pairs_s']:>9.2f} {ref['tokens_s']:>10.0f} {'-':>9} {'-':>9} {'-':>8}", flush=True)
                print(f"  -> {modality} {size}: ours {m_name[5:]} / reference {ref['variant'][10:]} pairs/s = "
                      f"{base[m_name]['pairs_s'] / ref['pairs_s']:.2f}x (ours torch {torch.__version__}, reference "
                      f"torch {ref['torch']}, threads {torch.get_num_threads()} / {ref['threads']}; reference masks "
                      f"{ref['masked_per_row']:g} per row, drawn outside its step in {ref['mask_s']:.4f} s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
