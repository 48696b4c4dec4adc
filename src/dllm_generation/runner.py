"""One forward of the decoder stack, run by the library so it can skip layers.

We call `embed_tokens`, each decoder layer, `norm` and `lm_head` of the stock transformers model
ourselves (gpt-fast style). That gives three things `model.forward` does not: the block-causal
attention pattern, K/V written in place into `BlockDiffusionCache`, and the freedom not to call a
layer at all on a layer-reuse step. Nothing on the model is patched.
"""

from __future__ import annotations

import inspect

import torch

from .plan import LayerAction, ReusePlan

__all__ = ["LayerStackRunner", "ReusePlan"]


class LayerStackRunner:
    """Runs embed -> layers -> norm -> lm_head with a diffusion cache and optional reuse."""

    def __init__(self, model):
        base = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, n) for n in needed) or not hasattr(model, "lm_head"):
            raise ValueError(
                f"unsupported architecture: {type(model).__name__} lacks model.embed_tokens/layers/norm/rotary_emb/lm_head"
            )
        self.model = model
        self.embed = base.embed_tokens
        self.layers = list(base.layers[: model.config.num_hidden_layers])
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.lm_head
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.additive_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.num_layers = len(self.layers)
        # Executions per layer, counted where the layer is called (for stats and tests).
        self.layer_runs = [0] * self.num_layers
        self.layer_skips = [0] * self.num_layers

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def to_attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean `allowed` [R, 1, q, kv] -> what the attention implementation expects."""
        if not self.additive_mask:
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        neg = torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, neg)

    def hidden_states(self, tokens, positions, allowed, cache, plan: ReusePlan | None = None) -> torch.Tensor:
        """Final-norm hidden states for `tokens` [R, q] at `positions` [R, q]."""
        hidden = self.embed(tokens)
        pos_emb = self.rotary(hidden, positions)
        mask = self.to_attention_mask(allowed)
        kwargs = {self.cache_kwarg: cache}
        for i, layer in enumerate(self.layers):
            action = plan.actions[i] if plan is not None else LayerAction.RUN
            if action is LayerAction.RECALL:
                # Reuse step: the layer is not called at all.
                hidden = cache.layers[i].recall_reuse(hidden, plan.offsets, plan.residual)
                self.layer_skips[i] += 1
                continue
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if action is LayerAction.STORE:
                cache.layers[i].store_reuse(hidden, out, plan.offsets)
            hidden = out
            self.layer_runs[i] += 1
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
