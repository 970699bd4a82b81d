"""Text generation for Mamba2LM: prefill with the full-sequence ops, then one constant-memory decode
step per token (captured in a CUDA graph on GPU).

    out = model.generate(prompts, max_new_tokens=64, temperature=0.7, top_p=0.9)
    out.sequences, out.new_tokens, out.prefill_tokens_per_s, out.decode_tokens_per_s

Memory does not grow with the number of tokens: the cache, the graph's buffers and the output
buffer are allocated once; during decode only the last token's logits exist.
"""

import time
from dataclasses import dataclass, field

import torch

__all__ = ["generate", "GenerationOutput", "DecodeGraph", "process_logits", "sample", "left_pad"]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor          # (b, prompt_len + n) prompt (left-padded) then new tokens
    new_tokens: torch.Tensor         # (b, n); rows that finished early hold pad_token_id after eos
    prompt_lengths: list             # real (unpadded) prompt length of each row
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0  # new tokens (all rows) / decode time, excluding prefill
    texts: list = field(default=None)  # decoded new tokens (stop strings cut) when a tokenizer is given
    used_cuda_graph: bool = False


def left_pad(prompts, pad_token_id=0, device=None):
    """A list of token-id lists (or 1-D tensors) -> (ids (b, l) left-padded, mask (b, l) bool)."""
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = True
    return ids.to(device), mask.to(device)


# -- logits processing --------------------------------------------------------------------------
def process_logits(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """HF-style processing of fp32 logits (b, V): repetition penalty on tokens where `seen` (b, V)
    is True, then (when sampling) temperature, top-k, top-p (filtered entries become -inf)."""
    if repetition_penalty != 1.0 and seen is not None:
        pen = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if temperature <= 0:
        return logits
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits, temperature=0.0, generator=None):
    """Greedy (temperature <= 0) or a multinomial draw from processed logits (b, V) -> (b,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- CUDA graph of one decode step --------------------------------------------------------------
class DecodeGraph:
    """The model's decode step captured once for a fixed batch: static token input, static logits
    output (b, V), static cache. `step(ids)` copies ids in, replays, returns the logits buffer.
    On CPU (or cuda_graph=False) it runs the step eagerly with the same interface."""

    def __init__(self, model, batch_size, use_graph=True, ssm_state_dtype=torch.float32):
        self.model = model
        self.batch_size = batch_size
        self.ssm_state_dtype = ssm_state_dtype
        self.cache = model.allocate_cache(batch_size, ssm_dtype=ssm_state_dtype)
        dev = model.device
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.graph = None
        self.logits = None
        if use_graph and dev.type == "cuda":
            self._capture()

    def _capture(self):
        model, cache = self.model, self.cache
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: lazy inits, cuBLAS handles
                model.step(self.ids, cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model.step(self.ids, cache)
        cache.reset()

    def key(self):
        return (self.batch_size, self.model.device, self.model.dtype, self.model.lm_head.weight.data_ptr(),
                self.ssm_state_dtype, self.graph is not None)

    def step(self, ids):
        if self.graph is None:
            self.logits = self.model.step(ids, self.cache)
            return self.logits
        self.ids.copy_(ids)
        self.graph.replay()
        self.cache.seqlen_offset += 1
        return self.logits


def _decode_graph(model, batch_size, use_graph, ssm_state_dtype=torch.float32):
    """One DecodeGraph kept on the model (the latest batch size), reused across generate calls."""
    dg = getattr(model, "_decode_graph", None)
    want_graph = use_graph and model.device.type == "cuda"
    want = (batch_size, model.device, model.dtype, model.lm_head.weight.data_ptr(), ssm_state_dtype, want_graph)
    if dg is not None and dg.key() == want:
        dg.cache.reset()
        return dg
    model._decode_graph = None  # free the old graph and cache first
    dg = DecodeGraph(model, batch_size, use_graph=want_graph, ssm_state_dtype=ssm_state_dtype)
    model._decode_graph = dg
    return dg


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- generate -----------------------------------------------------------------------------------
@torch.inference_mode()
def generate(model, input_ids=None, max_new_tokens=32, attention_mask=None, temperature=0.0, top_k=0,
             top_p=1.0, repetition_penalty=1.0, eos_token_id=None, stop_strings=None, tokenizer=None,
             callback=None, cuda_graph=True, generator=None, pad_token_id=None, check_every=16,
             ssm_state_dtype=torch.float32, inputs_embeds=None):
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids: (b, l) tensor (with attention_mask (b, l) for left padding), or a list of token-id
      lists of different lengths (left-padded here). Padding never affects the result: each row
      gives the tokens it would give alone.
    temperature 0 is greedy; otherwise sampling after top_k (0 = off) and top_p (1 = off).
    repetition_penalty: HF's (divide positive / multiply negative logits of tokens already seen).
    eos_token_id: int or list; a row stops after emitting one and is then filled with pad_token_id.
    stop_strings: strings that end a row once its decoded text contains one (needs `tokenizer`).
    callback(tokens): called after every step with the new tokens (b,) as a CPU tensor.
    cuda_graph: capture the decode step in a CUDA graph on GPU (same tokens as eager).
    ssm_state_dtype: float32 (default) or bfloat16 decode states (half the state traffic).
    inputs_embeds: (b, l, d_model) prompt embeddings instead of ids (e.g. image tokens + text; with
      attention_mask for left padding); input_ids may then hold the prompt's ids for the
      repetition penalty and `sequences`, or be None.
    """
    cfg = model.config
    dev = model.device
    pad_id = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if inputs_embeds is not None:
        embeds = inputs_embeds.to(dev)
        b, l = embeds.shape[:2]
        ids = input_ids.to(dev) if input_ids is not None else torch.empty(b, 0, dtype=torch.long, device=dev)
        mask = _check_mask(attention_mask, (b, l), dev)
    elif isinstance(input_ids, torch.Tensor):
        ids = (input_ids[None] if input_ids.dim() == 1 else input_ids).to(dev)
        mask = _check_mask(attention_mask, tuple(ids.shape), dev)
        embeds = None
    else:
        if input_ids is None:
            raise ValueError("generate: pass input_ids or inputs_embeds")
        ids, mask = left_pad(input_ids, pad_id, dev)
        mask = None if bool(mask.all()) else mask
        embeds = None
    b, l = (ids.shape if embeds is None else embeds.shape[:2])
    lengths = [l] * b if mask is None else mask.sum(1).tolist()
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    vocab = cfg.vocab_size

    dg = _decode_graph(model, b, cuda_graph, ssm_state_dtype)
    cache = dg.cache
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=dev)
        if ids.shape[1]:
            m = mask if (mask is not None and mask.shape == ids.shape) else None
            real = ids if m is None else torch.where(m, ids, ids[:, -1:])  # pads count as the last token
            seen.scatter_(1, real.clamp(max=vocab - 1), True)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    host_done = [False] * b
    texts = [""] * b if tokenizer is not None else None

    _sync(dev)
    t0 = time.perf_counter()
    if embeds is None:
        logits = model(ids, cache=cache, mask=mask, num_last_tokens=1)[:, -1]
    else:
        logits = model(inputs_embeds=embeds, cache=cache, mask=mask, num_last_tokens=1)[:, -1]
    _sync(dev)
    t1 = time.perf_counter()
    n = 0
    per_step_host = callback is not None or bool(stops)
    for i in range(max_new_tokens):
        scores = process_logits(logits[:, :vocab].float(), seen, temperature, top_k, top_p, repetition_penalty)
        tok = sample(scores, temperature, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out[:, i] = tok
        n = i + 1
        if seen is not None:
            seen.scatter_(1, tok[:, None].clamp(max=vocab - 1), True)
        if len(eos):
            done |= torch.isin(tok, eos_t)
        if per_step_host:
            tok_cpu = tok.cpu()
            if callback is not None:
                callback(tok_cpu)
            if stops:
                _check_stops(tokenizer, out[:, :n], stops, host_done, texts, done)
        if (per_step_host or (len(eos) and (i + 1) % check_every == 0)) and bool(done.all()):
            break
        if i + 1 < max_new_tokens:
            logits = dg.step(tok)
    _sync(dev)
    t2 = time.perf_counter()

    new = out[:, :n]
    if tokenizer is not None:
        texts = [_cut_stops(tokenizer.decode(_until_eos(row, eos)), stops) for row in new.tolist()]
    steps = max(n - 1, 0)  # decode steps actually run (the first token comes from prefill)
    return GenerationOutput(
        sequences=torch.cat([ids, new], 1), new_tokens=new, prompt_lengths=lengths,
        prefill_s=t1 - t0, decode_s=t2 - t1,
        prefill_tokens_per_s=sum(lengths) / max(t1 - t0, 1e-12),
        decode_tokens_per_s=b * steps / max(t2 - t1, 1e-12),
        texts=texts, used_cuda_graph=dg.graph is not None)


def _check_mask(attention_mask, shape, dev):
    """attention_mask -> bool mask (None when all real); must be left padding."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(dev).bool()
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"generate: attention_mask {tuple(mask.shape)} must match the prompt's (batch, length) {tuple(shape)}")
    if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()) or not bool(mask[:, -1].all()):
        raise ValueError("generate: attention_mask must be left padding (0s then 1s, last token real)")
    return None if bool(mask.all()) else mask


def _until_eos(row, eos):
    for j, t in enumerate(row):
        if t in eos:
            return row[:j]
    return row


def _cut_stops(text, stops):
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut]


def _check_stops(tokenizer, new, stops, host_done, texts, done):
    # a stop string that completes now lies within the last few tokens: decode only those
    window = 4 * max(len(s) for s in stops) + 8
    rows = new[:, -window:].tolist()
    hit = []
    for r, row in enumerate(rows):
        if host_done[r]:
            continue
        text = tokenizer.decode(row)
        if any(s in text for s in stops):
            host_done[r] = True
            hit.append(r)
    if hit:
        done[torch.tensor(hit, device=done.device)] = True
