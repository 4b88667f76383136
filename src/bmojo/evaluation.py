"""Evaluation (mean LM and innovation loss over held-out windows) and sampling (``generate_text``, streamed by
``TextStream``), shared by ``bmojo train``, ``bmojo eval`` and ``bmojo generate``."""

from __future__ import annotations

import math
import sys

import torch

from .data import Corpus
from .devices import Device
from .errors import BMojoError
from .processes import Processes, all_sum


@torch.no_grad()
def evaluate(
    model,
    corpus: Corpus,
    windows,
    batch_size: int,
    device: Device | torch.device,
    bf16: bool = False,
    procs: Processes | None = None,
) -> dict:
    """Mean LM loss (and innovation loss) over ``windows``, split among the processes. The sums stay on the
    device (one graph per batch on XLA) and are read once, at the end."""
    procs = procs or Processes()
    device = device if isinstance(device, Device) else Device(device.type)
    was_training = model.training
    model.eval()
    # float64 where the device has it (XLA: Trainium has no float64)
    sums = torch.zeros(2, dtype=torch.float32 if device.is_xla else torch.float64, device=device.torch_device)
    rows, has_innovation = 0, False
    mine = windows[procs.rank :: procs.world_size]
    for i in range(0, len(mine), batch_size):
        x = corpus.batch(mine[i : i + batch_size]).to(device.torch_device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=x, labels=x)
        has_innovation = out.innovation_loss is not None
        innovation = out.innovation_loss if has_innovation else torch.zeros_like(out.lm_loss)
        sums += torch.stack([out.lm_loss, innovation]).to(sums.dtype) * len(x)
        rows += len(x)
        device.barrier()
    model.train(was_training)
    lm_sum, innovation_sum, rows = all_sum(torch.cat([sums, sums.new_tensor([rows])]), procs).tolist()
    return {
        "lm_loss": lm_sum / rows,
        "innovation_loss": innovation_sum / rows if has_innovation else None,
        "perplexity": math.exp(min(lm_sum / rows, 700.0)),  # capped: a diverged model must not crash the report
        "tokens": int(rows) * corpus.seq_len,
    }


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    streamer=None,
) -> str:
    """``prompt`` and its continuation. The prompt follows an end-of-document token, as every document did in
    training. ``temperature == 0`` decodes greedily. ``streamer`` (e.g. ``TextStream``) receives the tokens as
    they come."""
    from transformers import GenerationConfig

    ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(prompt)
    if not ids:
        raise BMojoError("the prompt is empty and the tokenizer has no end-of-document token to start from")
    torch.manual_seed(seed)
    model.eval()
    x = torch.tensor([ids], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        **sampling,
    )
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config, streamer=streamer)
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


class TextStream:
    """A ``generate(streamer=...)`` streamer (transformers' ``BaseStreamer`` interface: ``put``, ``end``) that
    writes the continuation to ``out`` (default: ``sys.stdout``) token by token and flushes; what it writes adds
    up to ``tokenizer.decode`` of all generated ids. A trailing U+FFFD, which may be an unfinished UTF-8
    character, waits for the next token."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] | None = None  # None until generate has passed the prompt
        self.written = 0

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:  # the first call carries the prompt
            self.ids = []
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        self._write(text[:-1] if text.endswith("\ufffd") else text)

    def end(self) -> None:
        self._write(self.tokenizer.decode(self.ids or []))

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            out = self.out or sys.stdout
            out.write(text[self.written :])
            out.flush()
            self.written = len(text)
