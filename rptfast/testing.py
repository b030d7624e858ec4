"""What the tests use: the tiny fixtures (made by rptfast.model.scratch) and an fp64 reference.

`make_tiny_model` writes a Hugging Face directory that transformers and vLLM both load, from a
random initialisation and a tokenizer trained on the spot; `reference_logprobs` is the independent
reference the engine and trainer log-probs are checked against.
"""

from __future__ import annotations

import torch

from rptfast.model.scratch import CHAR_ALPHABET, corpus_text, make_tiny_model, write_tokenizer

__all__ = ["CHAR_ALPHABET", "corpus_text", "make_tiny_model", "write_tokenizer", "reference_logprobs"]


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """fp64 log p(completion[t] | prompt, completion[:t]) under softmax(logits / T) from an HF forward."""
    ids = torch.tensor([prompt + completion], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()  # [C, V]
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, torch.tensor(completion, device=logp.device)[:, None])[:, 0].cpu()
