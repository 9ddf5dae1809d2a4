"""Tiny random-weight transformers models built from configs (never downloaded)."""

import torch
import transformers


def tiny_llama(seed: int | None = None, **overrides) -> transformers.PreTrainedModel:
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    kw.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def tiny_llama_cls(seed: int | None = None, num_labels: int = 3) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                                   pad_token_id=0)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int | None = None) -> transformers.PreTrainedModel:
    # dropout off: parity tests run in training mode (adapter gradients) and must be deterministic
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_qwen2(seed: int | None = None) -> transformers.PreTrainedModel:
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int | None = None) -> transformers.PreTrainedModel:
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     head_dim=16)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.MistralForCausalLM(cfg).eval()


def twin(builder, **kw):
    """Two identical copies of a model (same random weights)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return builder(seed=seed, **kw), builder(seed=seed, **kw)


def left_padded(B: int = 2, T: int = 6, pad: tuple[int, ...] = (2, 0), vocab: int = 97):
    """(input_ids, attention_mask) with row b left-padded by pad[b] tokens (pad id 0)."""
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(pad[:B]):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


def greedy(model, ids, mask, **kw):
    """Six greedy tokens: (sequences, per-step scores)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         return_dict_in_generate=True, output_scores=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.scores)


def lm_batch(B: int = 2, T: int = 7, labels: bool = True, pad: tuple[int, ...] = (0, 2), vocab: int = 97) -> dict:
    """A padded causal-LM batch (input_ids, attention_mask and, if `labels`, labels = input_ids)."""
    ids, mask = left_padded(B, T, pad, vocab)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = ids
    return out


def _eos_ids(model) -> list[int]:
    """The end-of-sequence ids `generate` stops rows on: the (base) model's generation config."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        config = getattr(m, "generation_config", None)
        if config is not None:
            eos = config.eos_token_id
            return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return []


def uncached_greedy(model, ids, mask, steps: int = 6, positions: bool = True, pad: int = 0, **kw):
    """Greedy decoding by full forwards with no cache at all: the ground truth a cached `generate` must equal
    token for token.  Mirrors `generate`'s bookkeeping: the attention mask grows by one each step, position ids
    are the running count of real tokens (`positions=False` for prompt learning, whose forward takes none),
    and a row that has emitted an end-of-sequence id (the model's generation config) is padded with `pad`;
    decoding stops when every row has.
    Returns (sequences, per-step logits)."""
    eos = torch.tensor(_eos_ids(model), dtype=torch.long)
    seq, mask = ids, mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    scores = []
    with torch.no_grad():
        for _ in range(steps):
            extra = {"position_ids": (mask.long().cumsum(-1) - 1).clamp_min(0)} if positions else {}
            logits = model(input_ids=seq, attention_mask=mask, use_cache=False, **extra, **kw).logits[:, -1].float()
            nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
            done = done | torch.isin(nxt, eos)
            scores.append(logits)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if bool(done.all()):  # generate stops once every row has finished
                break
    return seq, torch.stack(scores)


def tiny_t5(seed: int | None = None, **overrides) -> transformers.PreTrainedModel:
    """Encoder-decoder with T5's relative-position-bias attention (not routed through the attention registry)."""
    kw = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=2,
              decoder_start_token_id=0)
    kw.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()


def tiny_bart(seed: int | None = None, **overrides) -> transformers.PreTrainedModel:
    """Encoder-decoder with learned positions, attention through transformers' attention registry."""
    kw = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
              dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.3)
    kw.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**kw)).eval()
