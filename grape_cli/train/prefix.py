"""GRPO with each prompt run once, not once per sampled completion.

A GRPO batch holds every prompt `group_size` times (8 by default), once beside each of
its completions, and TRL runs the whole rows forwards and backwards. When prompts are
long next to their rewrites (a rambling 100-token query, a 20-token caption) most of
that work is the same prompt again. Here the distinct prompts go through the model once,
their keys and values are handed to each of their completions as a cache, and only the
completions are run per row. The log-probabilities and gradients are the same (measured
by `benchmarks/grpo_prefix.py`: within 2e-6 of TRL's, 3.6x less time for the loss's
forward and backward on the example's long prompts), since attention from a completion
to its prompt sees the same keys and values either way and the positions are the same.

Generation shares the prompts the same way: the distinct prompts are run once and
`generate` continues from their cache (its prefill was half of generating 24 tokens for
64 rows with ~100-token prompts).

Text models in one process only: a vision-language batch (pixel values, image grids)
takes TRL's own path, as do a model that returns router logits and a model wrapped for
distributed data parallel (two forward passes before one backward upset its gradient
hooks).
"""

from __future__ import annotations

import functools


def _distinct(input_ids, attention_mask, n: int):
    """The distinct rows of the first `n` tokens (ids and mask), and each row's index."""
    import torch

    prefix = torch.cat([input_ids[:, :n], attention_mask[:, :n]], dim=1)
    distinct, row_of = torch.unique(prefix, dim=0, return_inverse=True)
    return distinct[:, :n], distinct[:, n:], row_of


def _cache_for_rows(model, ids, mask, row_of, **kwargs):
    """Run the distinct prompts once and give each row its prompt's cache; returns the
    keyword `model` and `generate` take it by (`cache` in transformers 5) and the cache."""
    # A plain forward (the fused head returns no cache), scoring one position only.
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)
    key = "cache" if out.get("cache") is not None else "past_key_values"
    cache = out[key]
    cache.batch_select_indices(row_of)
    return key, cache


def shared_prefix_logps(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy):
    """Per-token log-probabilities (and entropies) of the last `logits_to_keep` tokens of
    each row, as TRL's `_get_per_token_logps_and_entropies` returns them for a model
    patched with its fused LM head; None when no two rows share a prompt (nothing to
    save: the caller takes TRL's path)."""

    n = input_ids.shape[1] - logits_to_keep - 1  # the last prompt token predicts the first
    if n < 1:
        return None
    ids, mask, row_of = _distinct(input_ids, attention_mask, n)
    if len(ids) == len(input_ids):
        return None
    key, cache = _cache_for_rows(model, ids, mask, row_of)
    tail = input_ids[:, n:]
    labels = tail.masked_fill(attention_mask[:, n:] == 0, -100)
    labels[:, 0] = -100  # the last prompt token is input, not scored
    scored = model(
        input_ids=tail,
        attention_mask=attention_mask,
        labels=labels,
        fused_lm_head=True,
        **{key: cache},
    )
    entropy = scored.entropy[:, -logits_to_keep:] if compute_entropy else None
    return scored.log_probs[:, -logits_to_keep:], entropy


def sharing_generate(model):
    """`model.generate`, run from a cache of the distinct prompts when rows repeat them.

    Positions follow the attention mask, as `generate` numbers left-padded prompts, so
    the continuation sees the cache it would have built itself."""
    generate = model.generate

    @functools.wraps(generate)
    def run(input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        n = 0 if input_ids is None else input_ids.shape[1] - 1  # generate runs the last
        plain = (
            kwargs  # images or other inputs: not a plain text batch
            or attention_mask is None
            or n < 1
            or getattr(generation_config, "cache_implementation", None) is not None
        )
        if not plain:
            ids, mask, row_of = _distinct(input_ids, attention_mask, n)
            if len(ids) < len(input_ids):
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
                key, cache = _cache_for_rows(model, ids, mask, row_of, position_ids=positions)
                kwargs[key] = cache
        return generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            **kwargs,
        )

    return run


def grpo_trainer_class():
    """TRL's `GRPOTrainer` with the loss pass above for text batches."""
    from trl import GRPOTrainer

    class SharedPrefixGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not getattr(self, "_is_vlm", True):  # generation gets the unwrapped model
                model = self.accelerator.unwrap_model(self.model)
                model.generate = sharing_generate(model)

        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            compute_aux_loss=False,
            **multimodal,
        ):
            import torch

            ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
            if not (ddp or compute_aux_loss) and all(v is None for v in multimodal.values()):
                size = batch_size or len(input_ids)
                parts = []
                for start in range(0, len(input_ids), size):
                    rows = slice(start, start + size)
                    with self.accelerator.autocast():
                        part = shared_prefix_logps(
                            model,
                            input_ids[rows],
                            attention_mask[rows],
                            logits_to_keep,
                            compute_entropy,
                        )
                    if part is None:
                        break
                    parts.append(part)
                else:
                    logps = torch.cat([p[0] for p in parts])
                    entropy = torch.cat([p[1] for p in parts]) if compute_entropy else None
                    return logps, entropy, None
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal,
            )

    return SharedPrefixGRPOTrainer
