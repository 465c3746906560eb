"""Test doubles shared by the tests and the launched test workers (never part of the installed package)."""

import torch


class NaNBackward(torch.autograd.Function):
    """Identity forward, NaN backward: what cuDNN's faulty SDPA backward does (a finite loss, NaN gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_loss(loss: torch.Tensor, kind: str | None) -> torch.Tensor:
    """`"value"`: the loss value becomes NaN, its gradients stay finite; `"grad"`: the value stays finite, every
    gradient becomes NaN; `None`: unchanged."""
    if kind == "value":
        return loss + (float("nan") - loss.detach())
    if kind == "grad":
        return NaNBackward.apply(loss)
    return loss


class ScriptedGenerate:
    """Stands in for `model.generate`: what each row says is chosen by `script(row, prompt_text)`, and the tokens are
    teacher-forced through the model's own forward pass one step at a time, as `generate` calls it (a prefill call,
    then one call per new token with the cache, that token being `input_ids`), so forward hooks see what they see in
    `generate`. The returned ids are `generate`'s: prompt, then the completion, padded after EOS."""

    def __init__(self, model, tokenizer, script):
        self.model, self.tokenizer, self.script = model, tokenizer, script
        self.calls = 0

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, generation_config=None, **kwargs):
        self.calls += 1
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        limit = generation_config.max_new_tokens if generation_config is not None else 64
        targets = [
            self.tokenizer(self.script(row, text), add_special_tokens=False).input_ids[:limit]
            for row, text in enumerate(texts)
        ]
        pad = self.tokenizer.pad_token_id
        ids, mask = input_ids, attention_mask
        past = self.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        for step in range(max(len(t) for t in targets)):
            column = torch.tensor([[t[step] if step < len(t) else pad] for t in targets], device=ids.device)
            ids = torch.cat([ids, column], dim=1)
            mask = torch.cat([mask, torch.ones_like(column)], dim=1)
            # like `generate` with a cache: only the new token goes in, the last in `input_ids`
            past = self.model(
                input_ids=column, attention_mask=mask, past_key_values=past, use_cache=True
            ).past_key_values
        return ids


class GenerateWithoutHookedForward:
    """A `generate` that samples from a separate copy of the model: the policy's own forward never runs (a custom or
    wrapped backend that forward hooks on the policy cannot see)."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, **kwargs):
        return self.engine.generate(**kwargs)


class GenerateThenAlter:
    """Runs the real `generate`, then alters its output the way a wrapper could: `"batch"` generates for every prompt
    twice and returns the first copy; `"longer"` appends a token that was never decoded; `"tokens"` replaces the first
    completion token of row 0."""

    def __init__(self, generate, how: str, prompt_length_of=lambda kwargs: kwargs["input_ids"].size(1)):
        self.generate, self.how, self.prompt_length_of = generate, how, prompt_length_of

    def __call__(self, **kwargs):
        if self.how == "batch":
            doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return self.generate(**doubled)[: kwargs["input_ids"].size(0)]
        out = self.generate(**kwargs)
        if self.how == "longer":
            return torch.cat([out, out[:, -1:]], dim=1)
        if self.how == "tokens":
            out = out.clone()
            start = self.prompt_length_of(kwargs)
            out[0, start] = (out[0, start] + 1) % 50 + 5
            return out
        raise ValueError(f"`how` got {self.how!r}; allowed values are ['batch', 'longer', 'tokens'].")
