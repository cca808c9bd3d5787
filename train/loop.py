"""The training loop: stages in order, each resumable, DDP/FSDP-aware, logged."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from edgevlm.train import distributed
from edgevlm.runtime.memory import peak_rss_mb, reset_peak_rss
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.processor import Processor
from edgevlm.train.batches import VQADataset, collate
from edgevlm.train.data.llava import load_llava_records
from edgevlm.train.engines import make_engine
from edgevlm.train.lora import set_trainable
from edgevlm.model.checkpoint import save_model
from edgevlm.model.load import load_model
from edgevlm.train.plan import BatchPlan, PlanSampler, lr_factor
from edgevlm.train.recipe import StageConfig, TrainConfig, stage_strategy
from edgevlm.train.state import latest_checkpoint

STOPPED = object()  # train_stage's result when stop_at_step ended it


def run(cfg: TrainConfig, resume: bool = False, stop_at_step: int = 0) -> Path:
    """Train every stage of ``cfg``; returns the final model directory (``output_dir/final``).

    ``stop_at_step`` (tests): leave the run after that many optimizer steps of the first unfinished
    stage, as if killed right after a checkpoint.
    """
    info = distributed.setup(need_group=any(stage_strategy(s, cfg) == "fsdp" for s in cfg.stages))
    try:
        return _run_stages(cfg, info, resume, stop_at_step)
    finally:
        distributed.teardown(info)


def _run_stages(cfg: TrainConfig, info, resume: bool, stop_at_step: int) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    model = load_model(cfg.model, fresh=cfg.fresh, **cfg.model_overrides)
    for i, stage in enumerate(cfg.stages):
        last = i == len(cfg.stages) - 1
        stage_out = out / "final" if last else out / stage.name / "model"
        if resume and (stage_out / "config.json").is_file():
            model = load_model(stage_out)
            continue
        model = train_stage(model, stage, cfg, info, out / stage.name, resume, stop_at_step)
        if model is STOPPED:
            return out / stage.name  # stopped early on purpose
        if info.is_main:
            save_model(model, stage_out)
        distributed.barrier(info)
        if model is None:  # FSDP: rank 0 consolidated the model; the others read it back
            model = load_model(stage_out)
    return out / "final"


def train_stage(model, stage: StageConfig, cfg: TrainConfig, info, stage_dir: Path, resume: bool,
                stop_at_step: int):
    torch.manual_seed(cfg.seed)
    data = load_llava_records(stage.data, stage.image_root or None, skip_bad_records=stage.skip_bad_records)
    records = data.records[: stage.max_records] if stage.max_records else data.records
    template = stage.template or model.cfg.chat_template
    if template != "plain":
        model.cfg.chat_template = template  # saved with the model: the runtime prompts as trained
    processor = Processor.create(model.tokenizer, template, model.cfg.preprocess)
    if stage_strategy(stage, cfg) == "fsdp" and any(r.image_path is None for r in records):
        # a rank whose micro-batch has no image would skip the vision tower's collectives and hang
        raise EdgeVLMError(f"stage {stage.name}: strategy fsdp needs an image in every record "
                           f"({sum(r.image_path is None for r in records)} are text-only); use strategy ddp")
    ds = VQADataset(records, processor, stage.max_length, model.n_visual_tokens, stage.qa_mode)
    model.train()
    groups = set_trainable(model, stage)
    n_train = {name: sum(p.numel() for p in ps) for name, ps in groups}
    names_of = {id(p): n for n, p in model.named_parameters()}
    if stage_strategy(stage, cfg) != "fsdp":
        model.to(info.device)  # fully_shard moves each unit's shard itself (never the whole model at once)
    engine = make_engine(model, [(g, [names_of[id(p)] for p in ps]) for g, ps in groups], cfg, stage, info)
    optim = engine.optimizer
    base_lrs = [g["lr"] for g in optim.param_groups]
    plan = BatchPlan(len(ds), stage.batch_size, cfg.seed, info.rank, info.world)
    total = stage.max_steps or math.ceil(stage.epochs * plan.per_epoch / stage.grad_accum)
    step = 0
    ckpt = latest_checkpoint(stage_dir / "checkpoints") if resume else None
    if ckpt is not None:
        step = engine.load_checkpoint(ckpt)
    log = _Logger(stage_dir, stage, info, total, n_train, data.n_skipped)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PlanSampler(plan, step * stage.grad_accum,
                                         total * stage.grad_accum), collate_fn=collate, num_workers=1)
    micro = iter(loader)
    while step < total:
        for g, lr in zip(optim.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, total, stage.warmup_ratio)
        loss, n, ids = _optimizer_step(engine, micro, stage, info, cfg)
        step += 1
        log.step(step, loss, n, optim.param_groups[0]["lr"], ids)
        if (stage.save_every and step % stage.save_every == 0) or step == total:
            engine.save_checkpoint(stage_dir / "checkpoints", step)
        if stop_at_step and step >= stop_at_step and step < total:
            log.close(model)
            return STOPPED
    log.close(model)
    return engine.final_model()


def _optimizer_step(engine, micro, stage: StageConfig, info, cfg: TrainConfig):
    engine.zero_grad()
    total_loss, n, ids = 0.0, 0, []
    for k in range(stage.grad_accum):
        batch = next(micro)
        with engine.accumulating(last=k == stage.grad_accum - 1), _autocast(cfg, info):
            pixels = batch["pixel_values"]
            out = engine.module(None if pixels is None else pixels.to(info.device),
                                [t.to(info.device) for t in batch["input_ids"]],
                                [t.to(info.device) for t in batch["labels"]],
                                _to(batch["segments"], info.device))
            engine.backward(out.loss)
        total_loss += out.loss.item() / stage.grad_accum
        n += len(batch["ids"])
        ids += batch["ids"]
    engine.step()
    return distributed.mean(total_loss, info), n, ids  # the loss of the global batch (mean over ranks)


def _to(tensors: list[torch.Tensor] | None, device) -> list[torch.Tensor] | None:
    return None if tensors is None else [t.to(device) for t in tensors]


def _autocast(cfg: TrainConfig, info):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=info.device.type, dtype=torch.bfloat16)


class _Logger:
    """tqdm bar and ``log.jsonl`` on rank 0; a per-rank ``rank{r}.json`` (sample ids seen, final
    checksum of trainable weights) under DDP, so a test can check the sharding and the sync."""

    def __init__(self, stage_dir: Path, stage: StageConfig, info, total: int, n_train: dict[str, int],
                 n_skipped: int):
        self.dir, self.info, self.t0 = stage_dir, info, time.perf_counter()
        self.samples = 0
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, desc=f"train {stage.name}", disable=not info.is_main, dynamic_ncols=True)
        self.f = open(stage_dir / "log.jsonl", "a") if info.is_main else None
        self.rank_f = open(stage_dir / f"rank{info.rank}.jsonl", "a") if info.enabled else None
        self.every = max(1, stage.log_every)
        self.rss_reset = reset_peak_rss()  # peak memory of this stage, not of earlier ones
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._write({"event": "start", "stage": stage.name, "trainable_params": sum(n_train.values()),
                     "trainable_by_group": n_train, "total_steps": total,
                     "skipped_records": n_skipped, "world_size": info.world})

    def step(self, step: int, loss: float, n: int, lr: float, ids: list[str]) -> None:
        if self.rank_f:
            self.rank_f.write(json.dumps({"step": step, "ids": ids}) + "\n")
        self.samples += n * self.info.world
        rate = self.samples / max(1e-9, time.perf_counter() - self.t0)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}", sps=f"{rate:.1f}")
        if step % self.every == 0 or step == self.bar.total:
            self._write({"step": step, "loss": round(loss, 5), "lr": lr, "samples_per_s": round(rate, 2)})

    def close(self, model) -> None:
        if self.rank_f:
            digest = hashlib.sha256()
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP: a DTensor shard
                    digest.update(name.encode() + full.detach().cpu().float().numpy().tobytes())
            self.rank_f.write(json.dumps({"trainable_sha256": digest.hexdigest()}) + "\n")
            self.rank_f.close()
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        self._write({"event": "end", "seconds": round(time.perf_counter() - self.t0, 2),
                     "samples_per_s": round(self.samples / max(1e-9, time.perf_counter() - self.t0), 2),
                     "peak_rss_mb": peak_rss_mb(), "peak_rss_scope": "stage" if self.rss_reset else "process",
                     "gpu_peak_mb": gpu})
        self.bar.close()
        if self.f:
            self.f.close()

    def _write(self, rec: dict) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
