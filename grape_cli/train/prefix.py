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

A vision-language batch of the Qwen2-VL family (pixel values with image grids, 3D
rotary positions from the model's own `get_rope_index`) shares its loss pass the same
way: the distinct prompts run once with their images, and each row's completion
continues at the positions the whole row would have had. Rows that share prompt tokens
but not the image keep TRL's path, as do other vision-language models, their generation,
a model that returns router logits and a model wrapped for distributed data parallel
(two forward passes before one backward upset its gradient hooks).
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


# The multimodal inputs of a batch the vision-language path below understands.
VISION_KEYS = {"pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids"}


def _vision_prefix(model, input_ids, attention_mask, n: int, row_of, first, vision: dict):
    """The distinct prompts' images and each row's 3D positions, for a Qwen2-VL-style
    batch (one block of pixel rows per sample, sized by its image grids); None when the
    model has no `get_rope_index` or two rows share prompt tokens but not their images."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA
    rope_index = getattr(getattr(base, "model", None), "get_rope_index", None)
    pixels, grid, counts = (vision.get(k) for k in ("pixel_values", "image_grid_thw", "num_images"))
    types = vision.get("mm_token_type_ids")
    if rope_index is None or pixels is None or grid is None or counts is None or types is None:
        return None
    per_image = grid.prod(dim=-1).tolist()
    per_sample, start = [], 0  # each sample's slice of grid rows and of pixel rows
    for k in counts:
        rows = sum(per_image[start : start + k])
        per_sample.append((start, start + k, rows))
        start += k
    offsets = [0]
    for _, _, rows in per_sample:
        offsets.append(offsets[-1] + rows)

    def images(i):
        a, b, _ = per_sample[i]
        return grid[a:b], pixels[offsets[i] : offsets[i + 1]]

    for i, d in enumerate(row_of.tolist()):  # the images must repeat with the prompt
        (g1, p1), (g2, p2) = images(i), images(first[d])
        if g1.shape != g2.shape or not torch.equal(g1, g2) or not torch.equal(p1, p2):
            return None
    positions, _ = rope_index(
        input_ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=attention_mask
    )
    reps = [images(i) for i in first]
    inputs = {
        "pixel_values": torch.cat([p for _, p in reps]),
        "image_grid_thw": torch.cat([g for g, _ in reps]),
        "mm_token_type_ids": types[first, :n],
        "position_ids": positions[:, first, :n],
    }
    return inputs, positions[:, :, n:]


def shared_prefix_logps(
    model, input_ids, attention_mask, logits_to_keep: int, compute_entropy, vision=None
):
    """Per-token log-probabilities (and entropies) of the last `logits_to_keep` tokens of
    each row, as TRL's `_get_per_token_logps_and_entropies` returns them for a model
    patched with its fused LM head; None when no two rows share a prompt (nothing to
    save) or the batch is one this module does not handle: the caller takes TRL's path.
    `vision`: the batch's multimodal inputs (`VISION_KEYS`), if any."""
    import torch

    n = input_ids.shape[1] - logits_to_keep - 1  # the last prompt token predicts the first
    if n < 1:
        return None
    ids, mask, row_of = _distinct(input_ids, attention_mask, n)
    if len(ids) == len(input_ids):
        return None
    prefix, tail_kwargs = {}, {}
    if vision:
        # Each distinct prompt's first row: its images stand for every row of the prompt.
        at = row_of.device  # the batch's (CUDA on a GPU: a CPU tensor here stopped training)
        first = torch.full((len(ids),), len(row_of), dtype=torch.long, device=at)
        first = first.scatter_reduce(0, row_of, torch.arange(len(row_of), device=at), "amin")
        first = first.tolist()
        found = _vision_prefix(model, input_ids, attention_mask, n, row_of, first, vision)
        if found is None:
            return None
        prefix, tail_kwargs["position_ids"] = found
    key, cache = _cache_for_rows(model, ids, mask, row_of, **prefix)
    tail = input_ids[:, n:]
    labels = tail.masked_fill(attention_mask[:, n:] == 0, -100)
    labels[:, 0] = -100  # the last prompt token is input, not scored
    scored = model(
        input_ids=tail,
        attention_mask=attention_mask,
        labels=labels,
        fused_lm_head=True,
        **{key: cache},
        **tail_kwargs,
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
    """TRL's `GRPOTrainer` with the loss pass above (text and Qwen2-VL-style batches) and
    shared generation (text models)."""
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
            given = {k: v for k, v in multimodal.items() if v is not None}
            size = batch_size or len(input_ids)
            vision = given and set(given) <= VISION_KEYS and size >= len(input_ids)
            if not (ddp or compute_aux_loss) and (vision or not given):
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
                            given,
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
