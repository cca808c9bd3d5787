"""Peers measured in the same run, on the same weights, with the same image, prompt length and
number of new tokens, so every report shows edgevlm / peer ratios taken side by side:

* ``hf_eager`` -- Hugging Face ``generate()`` in eager PyTorch (eager attention, no compile), the
  path MobileVLM's own inference script takes: vision tower + integrator in torch, the spliced
  ``inputs_embeds`` handed to ``LlamaForCausalLM.generate``. Timestamps come from a logits
  processor, which ``generate`` calls once per step right after that step's forward pass.
* ``llamacpp_raw`` -- llama.cpp through llama-cpp-python's low-level C bindings on the same GGUF
  bundle (LLM + mmproj), with no edgevlm code in the timed path: libmtmd loads and tokenises the
  image and prompt as ``llama-mtmd-cli`` does, ``mtmd_encode_chunk`` runs the vision tower,
  ``llama_decode`` the prefill and each decode step, a greedy ``llama_sampler`` picks tokens.

Both ignore EOS (a fixed number of new tokens) and report the same metrics as edgevlm cases.
"""
from __future__ import annotations

import ctypes
import tempfile
import time
from pathlib import Path

from edgevlm.runtime.memory import current_rss_mb, peak_rss_mb
from edgevlm.benchmarks.case import (accelerator, collect_metrics, load_torch_model,
                                     threads_of, timed_runs, torch_gpu_peak_mb)
from edgevlm.benchmarks.matrix import bench_image, filler_question, image_prompt
from edgevlm.runtime.errors import EdgeVLMError

# --- Hugging Face eager --------------------------------------------------------------------------


class _StepClock:
    """A transformers LogitsProcessor that only records when each step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def measure_hf_eager(case: dict, prepared: dict) -> dict:
    import torch
    from transformers import LogitsProcessorList

    torch.set_num_threads(threads_of(case))
    device = accelerator(case)
    model = load_torch_model(case, case["precision"], device)
    for hf in (model.llm, model.vision_tower.vision_tower):  # MobileVLM's era (transformers 4.33): no SDPA
        hf.set_attn_implementation("eager")
    rss_loaded = current_rss_mb()
    wl, tok = case["workload"], model.tokenizer
    n_img, n_new = wl["images"], wl["new_tokens"]
    question = filler_question(tok.encode, wl["prompt_tokens"])
    ids = torch.tensor(model.prompt_ids(image_prompt(question, n_img), with_image=n_img > 0), device=device)
    pixels = None
    if n_img:
        pixels = torch.cat([model.preprocess(bench_image(case["seed"] + i)) for i in range(n_img)]).to(device)
    last: dict = {}

    def run_once() -> dict:
        clock = _StepClock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            images, weights = model.encode(pixels) if pixels is not None else (None, None)  # [B, M, D]
            t1 = time.perf_counter()
            embeds = model.embed_with_images(ids, images)[None]  # [1, T, D]
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            with model.conditioned(weights, [n_img]):  # vlora / gated_prefix: per-image LLM weights
                out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                                         max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                                         use_cache=True, logits_processor=LogitsProcessorList([clock]),
                                         pad_token_id=tok.eos_id)
        t = clock.times
        n_vis = 0 if images is None else images.shape[0] * images.shape[1]
        last.update(n_visual_tokens=n_vis, n_prompt_tokens=int((ids >= 0).sum()), n_generated=len(t),
                    token_ids=out[0, -len(t):].tolist())
        return {"vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t[0] - t1) * 1e3, "ttft_ms": (t[0] - t0) * 1e3,
                "prefill_tok_s": (embeds.shape[1]) / max(t[0] - t1, 1e-9),
                "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None,
                "total_ms": (t[-1] - t0) * 1e3}

    runs = timed_runs(case, run_once)
    return {"metrics": collect_metrics(runs), "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "gpu_peak_mb": torch_gpu_peak_mb(), "n_visual_tokens": last["n_visual_tokens"],
            "n_prompt_tokens": last["n_prompt_tokens"], "n_generated": last["n_generated"],
            "token_ids_head": last["token_ids"][:8], "threads_effective": threads_of(case),
            "attn_implementation": "eager", "accelerator": device}


# --- raw llama.cpp -------------------------------------------------------------------------------


class _RawLlama:
    """llama.cpp model + context + mtmd context, opened with the C API only."""

    def __init__(self, llm: Path, mmproj: Path, threads: int, n_ctx: int, gpu: bool = False):
        import llama_cpp as L
        from llama_cpp import mtmd_cpp as M

        self.L, self.M = L, M
        self._log = L.llama_log_callback(lambda level, text, user: None)  # keep a reference
        L.llama_log_set(self._log, ctypes.c_void_p(0))
        M.mtmd_helper_log_set(self._log, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = -1 if gpu else 0
        self.model = L.llama_model_load_from_file(str(llm).encode(), mp)
        if not self.model:
            raise EdgeVLMError(f"llama.cpp could not load {llm}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        mc = M.mtmd_context_params_default()
        mc.use_gpu, mc.n_threads, mc.print_timings, mc.warmup = gpu, threads, False, False
        self.mctx = M.mtmd_init_from_file(str(mmproj).encode(), self.model, mc)
        if not self.ctx or not self.mctx:
            raise EdgeVLMError(f"llama.cpp could not open a context for {llm} / {mmproj}")
        self.sampler = L.llama_sampler_init_greedy()
        self.chunks = None

    def tokenize(self, text: str, image_files: list[str]) -> None:
        M = self.M
        bitmaps = [M.mtmd_helper_bitmap_init_from_file(self.mctx, f.encode(), False) for f in image_files]
        arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        raw = text.encode()
        inp = M.mtmd_input_text(raw, len(raw), True, True)
        self.chunks = M.mtmd_input_chunks_init()
        if M.mtmd_tokenize(self.mctx, self.chunks, ctypes.byref(inp), arr, len(bitmaps)) != 0:
            raise EdgeVLMError("mtmd_tokenize failed on the benchmark prompt")
        for b in bitmaps:
            M.mtmd_bitmap_free(b)

    def run(self, n_new: int) -> dict:
        """One request: (vision seconds, prefill seconds, per-token times, token ids, token counts)."""
        L, M = self.L, self.M
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        n_past, vision_s, n_vis, n_text = 0, 0.0, 0, 0
        t0 = time.perf_counter()
        n_chunks = M.mtmd_input_chunks_size(self.chunks)
        for i in range(n_chunks):
            chunk = M.mtmd_input_chunks_get(self.chunks, i)
            new_past = L.llama_pos(0)
            n_tok = M.mtmd_input_chunk_get_n_tokens(chunk)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                tv = time.perf_counter()
                if M.mtmd_encode_chunk(self.mctx, chunk) != 0:
                    raise EdgeVLMError("mtmd_encode_chunk failed")
                vision_s += time.perf_counter() - tv
                rc = M.mtmd_helper_decode_image_chunk(self.mctx, self.ctx, chunk, M.mtmd_get_output_embd(self.mctx),
                                                      n_past, 0, 512, ctypes.byref(new_past),
                                                      M.mtmd_helper_post_decode_callback(), None)
                n_vis += n_tok
            else:
                rc = M.mtmd_helper_eval_chunk_single(self.mctx, self.ctx, chunk, n_past, 0, 512,
                                                     i == n_chunks - 1, ctypes.byref(new_past))
                n_text += n_tok
            if rc != 0:
                raise EdgeVLMError(f"llama.cpp failed to evaluate prompt chunk {i} ({rc})")
            n_past = new_past.value
        token = L.llama_sampler_sample(self.sampler, self.ctx, -1)
        times, tokens = [time.perf_counter()], [token]
        buf = (L.llama_token * 1)()
        for _ in range(n_new - 1):
            buf[0] = token
            if L.llama_decode(self.ctx, L.llama_batch_get_one(buf, 1)) != 0:
                raise EdgeVLMError("llama_decode failed during decode")
            token = L.llama_sampler_sample(self.sampler, self.ctx, -1)
            times.append(time.perf_counter())
            tokens.append(token)
        return {"t0": t0, "vision_s": vision_s, "times": times, "tokens": tokens, "n_visual": n_vis, "n_text": n_text}

    def close(self) -> None:
        L, M = self.L, self.M
        if self.chunks:
            M.mtmd_input_chunks_free(self.chunks)
        L.llama_sampler_free(self.sampler)
        M.mtmd_free(self.mctx)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def measure_llamacpp_raw(case: dict, prepared: dict) -> dict:
    from edgevlm.runtime.manifest import read_manifest
    from edgevlm.runtime.tokenizer import TextTokenizer

    bundle = Path(prepared["artifact"])
    manifest = read_manifest(bundle, verify=False)
    info = manifest.target_info
    wl = case["workload"]
    tok = TextTokenizer.from_dir(bundle)  # only to size the question like the other cases; not timed
    question = filler_question(tok.encode, wl["prompt_tokens"])
    raw = _RawLlama(bundle / info.llm[case["precision"]], bundle / info.mmproj, threads_of(case),
                    manifest.model.max_positions, gpu=accelerator(case) == "gpu")
    rss_loaded = current_rss_mb()
    marker = raw.M.mtmd_default_marker().decode()
    text = manifest.chat_template.prompt_text(image_prompt(question, wl["images"]), first=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(wl["images"]):
            files.append(f"{tmp}/image{i}.png")
            bench_image(case["seed"] + i).save(files[-1])
        raw.tokenize(text.replace("<image>", marker), files)
    last: dict = {}

    def run_once() -> dict:
        r = raw.run(wl["new_tokens"])
        t, t0 = r["times"], r["t0"]
        prefill_s = t[0] - t0 - r["vision_s"]
        last.update(r)
        return {"vision_ms": r["vision_s"] * 1e3, "prefill_ms": prefill_s * 1e3, "ttft_ms": (t[0] - t0) * 1e3,
                "prefill_tok_s": (r["n_visual"] + r["n_text"]) / max(prefill_s, 1e-9),
                "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None, "total_ms": (t[-1] - t0) * 1e3}

    runs = timed_runs(case, run_once)
    out = {"metrics": collect_metrics(runs), "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
           "gpu_peak_mb": None, "n_visual_tokens": last["n_visual"], "n_prompt_tokens": last["n_text"],
           "n_generated": len(last["tokens"]), "token_ids_head": last["tokens"][:8],
           "threads_effective": threads_of(case), "accelerator": accelerator(case)}
    raw.close()
    return out


MEASURE = {"hf_eager": measure_hf_eager, "llamacpp_raw": measure_llamacpp_raw}
