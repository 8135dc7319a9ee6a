"""DDP with 2 CPU processes (gloo): teachers stay identical across ranks, the loss is the mean over
the masked positions of *both* ranks (not the mean of per-rank means), and one update's student
gradient equals that of a single process on the two ranks' batches concatenated."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared helpers, whatever pytest's import mode
from test_pretrain import fixed_batch, module_for  # noqa: E402

import d2v_train.lightning.pretrain as pretrain_module  # noqa: E402

# masks for the 12 images of a concatenated step (8 on rank 0, then 4 on rank 1), uneven per image
FIXED_MASKS = torch.rand(12, 16, generator=torch.Generator().manual_seed(3)) < torch.linspace(0.2, 0.8, 12)[:, None]


def fixed_mask(cfg: Any, shape: tuple[int, int], **kwargs: Any) -> torch.Tensor:
    """Stand-in for ``compute_mask``: rank 0's 8 images take rows 0-7, rank 1's 4 images rows
    8-11, a 12-image batch all rows, so one process on the concatenation sees the same masks."""
    rows = {8: FIXED_MASKS[:8], 4: FIXED_MASKS[8:], 12: FIXED_MASKS}[shape[0]]
    return rows.clone()


def first(items: list[Any]) -> Any:
    return items[0]


class Batches(torch.utils.data.Dataset):
    """Four fixed batches; with 2 ranks, rank 0 gets the 8-image ones and rank 1 the 4-image ones."""

    def __init__(self) -> None:
        full = fixed_batch("vision")["inputs"]
        self.items = [{"inputs": full if i % 2 == 0 else full[:4] * 0.5, "padding_mask": None} for i in range(4)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class Dump(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.rows: list[dict[str, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        pretrain_module.compute_mask = fixed_mask  # in the spawned rank processes only

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == 0:  # after DDP's gradient averaging, before the first update
            grads = {f"{who}.{n}": p.grad.detach().clone() for who in ("student", "head")
                     for n, p in getattr(pl_module, who).named_parameters() if p.grad is not None}
            torch.save(grads, Path(self.folder, f"grads{trainer.global_rank}.pt"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        s = pl_module.last_stats
        self.rows.append({k: float(s[k]) for k in ("loss", "local_sum", "local_count", "masked")})

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        rank = trainer.global_rank
        Path(self.folder, f"rows{rank}.json").write_text(json.dumps(self.rows))
        torch.save(
            {k: v.detach().clone() for k, v in pl_module.teacher.state_dict().items() if torch.is_tensor(v)},
            Path(self.folder, f"teacher{rank}.pt"),
        )
        torch.save({k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}, Path(self.folder, f"student{rank}.pt"))


def test_ddp_two_cpu_processes(tmp_path: Path, monkeypatch: Any) -> None:
    model = module_for("vision")
    loader = DataLoader(Batches(), batch_size=1, collate_fn=first)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Dump(str(tmp_path))], use_distributed_sampler=True,
    )
    trainer.fit(model, loader)
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 4
    for a, b in zip(*rows):
        assert a["masked"] == b["masked"] == a["local_count"] + b["local_count"]
        expected = (a["local_sum"] + b["local_sum"]) / (a["local_count"] + b["local_count"])
        assert abs(a["loss"] - expected) < 1e-5 and abs(b["loss"] - expected) < 1e-5
    uneven = [(a, b) for a, b in zip(*rows) if a["local_count"] != b["local_count"]]
    assert uneven  # 8 vs 4 images on the two ranks in some steps
    for a, b in uneven:  # there the global mean is not the mean of the per-rank means
        mean_of_means = (a["local_sum"] / a["local_count"] + b["local_sum"] / b["local_count"]) / 2
        assert abs(a["loss"] - mean_of_means) > 1e-4
    t0, t1 = (torch.load(tmp_path / f"teacher{r}.pt") for r in range(2))
    s0, s1 = (torch.load(tmp_path / f"student{r}.pt") for r in range(2))
    assert t0.keys() == t1.keys()
    for k in t0:
        assert torch.equal(t0[k], t1[k]), k
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert any(not torch.equal(t0[f"model.{k}"], s0[k]) for k in s0 if f"model.{k}" in t0)
    # the student gradient of update 1 equals one process's on the concatenated batch (uneven
    # masked counts: 8 vs 4 images and 20-80 % masks per image)
    g0, g1 = (torch.load(tmp_path / f"grads{r}.pt") for r in range(2))
    monkeypatch.setattr(pretrain_module, "compute_mask", fixed_mask)
    single = module_for("vision")
    full = fixed_batch("vision")["inputs"]
    out = single.compute_objective(torch.cat([full, full[:4] * 0.5]), None, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert int(out["masked"]) == int(FIXED_MASKS.sum()) == rows[0][0]["masked"]
    ref = {f"{who}.{n}": p.grad for who in ("student", "head") for n, p in getattr(single, who).named_parameters() if p.grad is not None}
    assert ref.keys() == g0.keys() == g1.keys() and len(ref) > 10
    for k in ref:
        torch.testing.assert_close(g0[k], g1[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(g0[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)
