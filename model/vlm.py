"""The vision-language model: vision tower -> integrator -> LLaMA decoder, LLaVA-style splicing."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from edgevlm.runtime.processor import Processor, count_images, expand_at_images, image_pixels, split_at_images
from edgevlm.model.config import LLMConfig, VLMConfig
from edgevlm.model.integrators import build_integrator, count_parameters
from edgevlm.model.integrators.base import placement
from edgevlm.model.vision import VisionTower

if TYPE_CHECKING:
    from edgevlm.runtime.generate import GenerationResult
    from edgevlm.runtime.tokenizer import TextTokenizer


def llama_config(cfg: LLMConfig, tokens) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokens.bos_id, eos_token_id=tokens.eos_id, pad_token_id=tokens.pad_id,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )


class EdgeVLM(nn.Module):
    """State-dict layout: ``vision_tower.vision_tower.*`` (CLIPVisionModel), ``integrator.*``,
    ``llm.*`` (LlamaForCausalLM)."""

    def __init__(self, cfg: VLMConfig, tokenizer: "TextTokenizer | None" = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vision_tower = VisionTower(cfg.vision)
        self.integrator = build_integrator(cfg.integrator, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                           cfg.vision.grid, llm=cfg.llm)
        self.llm = LlamaForCausalLM(llama_config(cfg.llm, cfg.tokens))
        # the one placement branch: integrators acting inside the LLM hook into it (their parameters
        # stay under integrator.*, the LLM's keys are unchanged; see model/integrators/hooks.py)
        self.in_llm = placement(self.integrator) != "tokens"
        if self.in_llm:
            self.integrator.attach(self.llm)

    # ---- shapes and sizes -------------------------------------------------------------------
    @property
    def n_visual_tokens(self) -> int:
        return self.integrator.num_tokens(self.cfg.vision.num_features)

    def parameter_counts(self) -> dict[str, int]:
        return {"vision_tower": count_parameters(self.vision_tower),
                "integrator": count_parameters(self.integrator), "llm": count_parameters(self.llm)}

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    # ---- inputs: the runtime's processor ----------------------------------------------------
    @property
    def processor(self) -> Processor:
        """Tokenizer + this model's chat template + preprocessing (``runtime/processor.py``)."""
        return Processor.create(self._require_tokenizer(), self.cfg.chat_template, self.cfg.preprocess)

    def preprocess(self, image) -> torch.Tensor:
        """PIL image / path / bytes -> pixel_values [1, 3, S, S] (the runtime's numpy code)."""
        return torch.from_numpy(image_pixels(image, self.cfg.preprocess))

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        return self.processor.prompt_ids(prompt, with_image)

    # ---- images -----------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> visual tokens [B, M, D_llm] in the LLM's embedding space (M may be 0)."""
        return self.encode(pixel_values, with_weights=False)[0]

    def image_weights(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """[B, 3, S, S] -> per-image LLM conditioning [B, ...] (vlora: low-rank A per target and
        layer; gated_prefix: the projected pooled feature), or None for integrators without it."""
        return self.encode(pixel_values)[1]

    def encode(self, pixel_values: torch.Tensor, with_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One vision-tower pass -> (visual tokens [B, M, D], per-image LLM conditioning or None)."""
        feats = self.vision_tower(pixel_values.to(self.device))  # [B, N, Dv]
        feats = feats.to(_dtype_of(self.integrator, feats.dtype))
        weights = self.integrator.image_weights(feats) if with_weights and self.in_llm else None
        return self.integrator(feats), weights  # [B, M, D], [B, ...] | None

    def conditioned(self, weights: torch.Tensor | None, counts: list[int]):
        """Context in which the LLM runs on a batch whose sample i holds ``counts[i]`` of the images
        behind ``weights`` [K, ...]; a no-op for token integrators."""
        if not self.in_llm:
            return contextlib.nullcontext()
        return self.integrator.conditioned(self.integrator.sample_weights(weights, counts))

    # ---- sequence assembly ------------------------------------------------------------------
    def embed_with_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """[T] ids containing IMAGE_TOKEN_INDEX once per image -> inputs_embeds [T', D]."""
        emb = self.llm.get_input_embeddings()
        parts = split_at_images(input_ids.tolist())
        n_pos = sum(1 for p in parts if isinstance(p, int))
        n_img = 0 if image_embeds is None else image_embeds.shape[0]
        if n_pos != n_img:
            raise ValueError(f"{n_pos} image placeholders but {n_img} images")
        if not parts:
            return emb(input_ids)  # [0, D]
        pieces = [image_embeds[p].to(emb.weight.dtype) if isinstance(p, int)
                  else emb(torch.tensor(p, device=input_ids.device)) for p in parts]
        return torch.cat(pieces, dim=0)

    def forward(self, pixel_values: torch.Tensor | None, input_ids: list[torch.Tensor],
                labels: list[torch.Tensor] | None = None, segments: list[torch.Tensor] | None = None):
        """Training/eval forward on a batch of variable-length sequences.

        ``input_ids[i]``: [T_i] with IMAGE_TOKEN_INDEX where an image goes (text-only samples have
        none); ``pixel_values``: [K, 3, S, S], the K images in placeholder order across the batch;
        ``labels[i]``: [T_i] with -100 on non-targets. Sequences are right-padded after splicing.
        ``segments[i]``: [T_i] packed-QA segment ids (``train/packing.py``; 0 = shared prefix), or
        None for ordinary causal sequences.
        """
        images, weights = (None, None) if pixel_values is None else self.encode(pixel_values)  # [K, M, D]
        embeds, targets, used = [], [], 0
        counts = [count_images(ids.tolist()) for ids in input_ids]  # images per sample
        for i, (ids, n) in enumerate(zip(input_ids, counts)):
            img = images[used : used + n] if n else None
            used += n
            embeds.append(self.embed_with_images(ids, img))  # [T_i', D]
            if labels is not None:
                targets.append(_expand(ids, labels[i], self.n_visual_tokens, -100))
        length = max(e.shape[0] for e in embeds)
        x = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])  # [B, L, D]
        mask = torch.zeros(len(embeds), length, dtype=torch.long, device=x.device)
        y = torch.full((len(embeds), length), -100, dtype=torch.long, device=x.device)
        for i, e in enumerate(embeds):
            x[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
            if labels is not None:
                y[i, : e.shape[0]] = targets[i]
        y = y if labels is not None else None
        with self.conditioned(weights, counts):  # per-sample image weights for vlora / gated_prefix
            if segments is None:
                return self.llm(inputs_embeds=x, attention_mask=mask, labels=y)
            from .segments import attention_and_positions

            segs = [_expand(ids, s, self.n_visual_tokens, 0) for ids, s in zip(input_ids, segments)]
            mask4d, positions = attention_and_positions(segs, length, x.dtype)
            return self.llm(inputs_embeds=x, attention_mask=mask4d, position_ids=positions, labels=y)

    # ---- generation (the runtime's one loop, torch backend) ---------------------------------
    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen) -> "GenerationResult":
        """Answer ``prompt`` about ``image`` (PIL / path / bytes / None). ``gen``: GenerationConfig
        fields (do_sample, temperature, top_k, top_p, repetition_penalty, seed, stop)."""
        from edgevlm.runtime.generate import GenerationConfig, generate

        ids, pixels = self.processor(image, prompt)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, **gen)
        return generate(self._backend(), self._require_tokenizer(), ids, pixels, cfg)

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen) -> Iterator[str]:
        from edgevlm.runtime.generate import GenerationConfig, stream

        ids, pixels = self.processor(image, prompt)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, **gen)
        return stream(self._backend(), self._require_tokenizer(), ids, pixels, cfg)

    def _backend(self):
        from .torch_backend import TorchBackend

        return TorchBackend(self)

    def _require_tokenizer(self) -> "TextTokenizer":
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached (load it with load_model)")
        return self.tokenizer


def _expand(ids: torch.Tensor, values: torch.Tensor, n_visual: int, fill: int) -> torch.Tensor:
    """Per-id ``values`` (labels, segment ids) for the spliced sequence (visual positions: ``fill``)."""
    out = expand_at_images(ids.tolist(), values.tolist(), n_visual, fill)
    return torch.tensor(out, dtype=torch.long, device=values.device)


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(module.parameters(), None)
    return default if p is None else p.dtype
