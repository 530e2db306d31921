"""Task metrics on a model: what a task declares in :attr:`FederatedTask.metric`.

- ``perplexity``: the token-weighted target loss and its exponential (:func:`lordba_fl.train.evaluate_loss`),
  reported every round for every task;
- ``exact-match``: greedy generation from the prompt, the task's ``answer_of`` applied to the text
  (default: its first non-empty line, stripped), compared with the example's ``answer``;
- ``label-accuracy``: a classification target scored without free generation: each label the task
  declares is scored by its log-likelihood as the target of the prompt, the most likely one wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lordba_fl.data.tasks import Example, FederatedTask
from lordba_fl.train import IGNORE, batch_to, collate, encode_examples, generate, model_device, pad_id_of


def first_line(text: str) -> str:
    """The default answer extraction: the first non-empty line of a generation, stripped."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


@torch.no_grad()
def target_logprobs(model: nn.Module, tok, examples: Sequence[Example], seq_len: int, batch_size: int = 8) -> list[float]:
    """Summed log-probability of each example's target tokens (and EOS) given its prompt."""
    items = []
    for ex in examples:
        enc = encode_examples(tok, [ex], seq_len)  # raises when the target does not fit in seq_len
        items.append(enc[0])
    model.eval()
    pad, device, out = pad_id_of(tok), model_device(model), []
    for i in range(0, len(items), batch_size):
        batch = batch_to(collate(items[i : i + batch_size], pad), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]  # (B, T-1)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out += (logp * (labels != IGNORE)).sum(dim=1).tolist()
    return out


def exact_match(model: nn.Module, tok, task: FederatedTask, examples: Sequence[Example]) -> float:
    """Fraction of ``examples`` whose extracted generated answer equals ``example.answer``."""
    extract = task.answer_of or first_line
    hits = sum(extract(generate(model, tok, ex.prompt, max_new_tokens=task.max_new_tokens)) == ex.answer
               for ex in examples)
    return hits / max(len(examples), 1)


def label_accuracy(model: nn.Module, tok, task: FederatedTask, examples: Sequence[Example], seq_len: int) -> float:
    """Fraction of ``examples`` whose most likely label (of ``task.labels``) is their ``answer``."""
    labels = list(task.labels or ())
    candidates = [Example(ex.prompt, label) for ex in examples for label in labels]
    scores = torch.tensor(target_logprobs(model, tok, candidates, seq_len)).view(len(examples), len(labels))
    best = scores.argmax(dim=1).tolist()
    return sum(labels[b] == ex.answer for b, ex in zip(best, examples)) / max(len(examples), 1)


def score(model: nn.Module, tok, task: FederatedTask, examples: Sequence[Example], seq_len: int) -> float | None:
    """The task's declared metric on ``examples`` (None for ``perplexity``: the loss is reported anyway)."""
    if task.metric == "exact-match":
        return exact_match(model, tok, task, examples)
    if task.metric == "label-accuracy":
        return label_accuracy(model, tok, task, examples, seq_len)
    return None
