"""generate(): logits processing against transformers' processors, sampling, eos, stop strings,
streaming, the tokenizer; on GPU: CUDA-graph decode == eager, constant memory."""

import io

import pytest
import torch

from mlmamba import Mamba2Config, Mamba2LM
from mlmamba.generation import left_pad, process_logits
from mlmamba.tokenizer import TextStreamer, Tokenizer

from test_lm import randomize_ssm, seed_from


def tiny_model(rng, vocab=89, n_layer=2, device="cpu", dtype=None):
    torch.manual_seed(seed_from(rng))
    if device == "cpu":
        cfg = Mamba2Config(d_model=48, n_layer=n_layer, vocab_size=vocab, d_state=16, headdim=16,
                           chunk_size=8, pad_vocab_size_multiple=16)
    else:  # the kernels' usual sizes (headdim 64, d_state 64)
        cfg = Mamba2Config(d_model=128, n_layer=n_layer, vocab_size=vocab, d_state=64, headdim=64,
                           chunk_size=64, pad_vocab_size_multiple=16)
    model = Mamba2LM(cfg).eval()
    randomize_ssm(model, rng)
    return model.to(device=device, dtype=dtype)


def word_tokenizer(vocab):
    """A word-level tokenizer: token i is the word 'w{i}'; <|endoftext|> is the last id."""
    from tokenizers import Tokenizer as T, models, pre_tokenizers, decoders
    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = T(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def test_process_logits_matches_transformers(rng):
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(4, 301, generator=rng) * 3
    prev = torch.randint(0, 301, (4, 13), generator=rng)
    seen = torch.zeros(4, 301, dtype=torch.bool).scatter_(1, prev, True)
    for temp, k, p, pen in ((0.0, 0, 1.0, 1.3), (0.7, 0, 1.0, 1.0), (1.3, 17, 1.0, 1.0),
                            (0.9, 0, 0.8, 1.0), (0.6, 40, 0.5, 1.2)):
        want = logits.clone()
        if pen != 1.0:
            want = RepetitionPenaltyLogitsProcessor(pen)(prev, want)
        if temp > 0:
            want = TemperatureLogitsWarper(temp)(prev, want)
            if k:
                want = TopKLogitsWarper(k)(prev, want)
            if p < 1:
                want = TopPLogitsWarper(p)(prev, want)
        got = process_logits(logits, seen, temp, k, p, pen)
        assert torch.equal(got.isinf(), want.isinf()), (temp, k, p, pen)
        fin = want.isfinite()
        torch.testing.assert_close(got[fin], want[fin])


def test_sampling(rng):
    model = tiny_model(rng)
    prompt = torch.randint(0, 89, (2, 7), generator=rng)
    greedy = model.generate(prompt, max_new_tokens=9).new_tokens
    # top_k=1 and a tiny top_p are greedy whatever the temperature
    assert torch.equal(model.generate(prompt, max_new_tokens=9, temperature=1.5, top_k=1).new_tokens, greedy)
    assert torch.equal(model.generate(prompt, max_new_tokens=9, temperature=0.8, top_p=1e-6).new_tokens, greedy)
    seed = seed_from(rng)
    runs = [model.generate(prompt, max_new_tokens=9, temperature=2.0, top_k=20,
                           generator=torch.Generator().manual_seed(seed)).new_tokens for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].max() < model.config.vocab_size  # never a padding row of the vocab
    # samples follow the model's distribution: token frequencies of one step vs its softmax
    one = torch.randint(0, 89, (1, 5), generator=rng)
    with torch.no_grad():
        probs = model(one)[0, -1, :89].float().div(1.5).softmax(-1)
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([model.generate(one.expand(256, -1), max_new_tokens=1, temperature=1.5,
                                        generator=g).new_tokens[:, 0] for _ in range(16)]).flatten()
    freq = torch.bincount(draws, minlength=89).double() / draws.numel()
    assert (freq - probs.double()).abs().sum() < 0.25  # 2x total variation of 4096 draws (~0.1 expected)


def test_eos_stops_and_pads(rng):
    model = tiny_model(rng)
    prompts = [torch.randint(0, 89, (n,), generator=rng).tolist() for n in (6, 11)]
    free = model.generate(prompts, max_new_tokens=12).new_tokens
    eos = int(free[0, 3])  # row 0 emits it at step 3 at the latest
    out = model.generate(prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=88, check_every=1)
    for r in range(2):
        row = free[r].tolist()
        stop = row.index(eos) + 1 if eos in row else 12
        got = out.new_tokens[r].tolist()
        assert got[:stop] == row[:stop]
        assert all(t == 88 for t in got[stop:])
    if eos in free[1].tolist():  # both rows finish: generation ends early
        assert out.new_tokens.shape[1] == max(free[r].tolist().index(eos) + 1 for r in range(2))


def test_stop_strings_callback_and_tokenizer(rng, tmp_path):
    model = tiny_model(rng, vocab=89)
    tok = Tokenizer(word_tokenizer(89))
    assert tok.eos_token_id == 88
    ids = tok.encode("w1 w2 w3 w40")
    assert ids == [1, 2, 3, 40] and tok.decode(ids) == "w1 w2 w3 w40"
    free = model.generate([ids], max_new_tokens=10).new_tokens[0].tolist()
    stop = tok.decode(free[4:6])  # the text of new tokens 4 and 5
    seen = []
    buf = io.StringIO()
    streamer = TextStreamer(tok, file=buf)
    out = model.generate([ids], max_new_tokens=10, stop_strings=[stop], tokenizer=tok,
                         callback=lambda t: (seen.append(t.tolist()), streamer(t)))
    n = out.new_tokens.shape[1]
    assert out.new_tokens[0].tolist() == free[:n]
    assert stop in tok.decode(free[:n]) and stop not in tok.decode(free[:n - 1])
    assert out.texts[0] == tok.decode(free[:n]).split(stop)[0]
    assert [s[0] for s in seen] == free[:n]
    assert buf.getvalue() == streamer.text() == tok.decode(free[:n])
    # from a directory, and the error without tokenizer.json
    word_tokenizer(89).save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_pretrained(tmp_path).encode("w5") == [5]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        model.generate([ids], stop_strings=["x"])


def test_generate_inputs(rng):
    model = tiny_model(rng)
    ids, mask = left_pad([[3, 4], [5, 6, 7, 8]], pad_token_id=1)
    assert ids.tolist() == [[1, 1, 3, 4], [5, 6, 7, 8]]
    a = model.generate(ids, attention_mask=mask, max_new_tokens=5).new_tokens
    b = model.generate([[3, 4], [5, 6, 7, 8]], max_new_tokens=5).new_tokens
    assert torch.equal(a, b)
    with torch.no_grad():
        emb = model.backbone.embedding(ids)
    c = model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(c.new_tokens, a) and c.sequences.shape == (2, 5)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1], []])


# -- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_same_tokens_as_eager(rng, dtype):
    model = tiny_model(rng, n_layer=3, device="cuda", dtype=dtype)
    prompts = [torch.randint(0, 89, (n,), generator=rng).tolist() for n in (5, 17, 2)]
    eager = model.generate(prompts, max_new_tokens=24, cuda_graph=False)
    graph = model.generate(prompts, max_new_tokens=24, cuda_graph=True)
    assert graph.used_cuda_graph and not eager.used_cuda_graph
    assert torch.equal(eager.new_tokens, graph.new_tokens)
    again = model.generate(prompts, max_new_tokens=24)  # the captured graph is reused
    assert torch.equal(again.new_tokens, graph.new_tokens)


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    model = tiny_model(rng, n_layer=2, device="cuda").cpu()
    ids = torch.randint(0, 89, (2, 137), generator=rng)
    with torch.no_grad():
        want = model(ids)
        got = model.cuda()(ids.cuda()).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.gpu
def test_decode_memory_constant(rng):
    model = tiny_model(rng, n_layer=2, device="cuda", dtype=torch.bfloat16)
    prompt = [torch.randint(0, 89, (9,), generator=rng).tolist()]
    model.generate(prompt, max_new_tokens=10)  # capture the graph
    peaks = []
    for n in (100, 3000):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model.generate(prompt, max_new_tokens=n)
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] - peaks[0] <= 3000 * 8 + 4096  # only the output buffer grows


def test_streamer_holds_back_partial_utf8_until_end():
    import io

    from mlmamba.tokenizer import TextStreamer, byte_tokenizer
    tok = byte_tokenizer()
    ids = tok.encode("aé")                 # "a" then the two bytes of "é"
    assert len(ids) == 3
    out = io.StringIO()
    s = TextStreamer(tok, file=out)
    for i in ids[:2]:                      # "a" and the first byte of "é"
        s(torch.tensor([i]))
    assert out.getvalue() == "a"           # the partial character is held back
    s.end()
    assert out.getvalue() == tok.decode(ids[:2]) == "a\ufffd"
