"""Forward FLOPs of a whole model: the yardstick for how fast a compressed model could be.

The ideal speed-up of an exported model is ``forward_flops(dense) / forward_flops(exported)``: what it would gain if
run time followed the matrix-multiply work alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_flops(model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass on a ``batch_size x seq_len`` batch of token ids.

    Counts every ``Linear``/``Conv1D`` (attention, feed-forward, the low-rank factors of compressed layers, pooler
    and head, each at the rows it really sees) and the attention scores and weighted values
    (``4 * batch * seq_len^2 * width`` per attention layer). torch's ``FlopCounterMode`` does the counting; it has
    no formula for the CPU kernel of ``scaled_dot_product_attention``, so the forward runs with transformers'
    eager attention (the same matmuls written out), and the model's own choice is restored afterwards.
    Elementwise work (softmax, GELU, layer norm) is not counted.
    """
    set_attention = getattr(model, "set_attn_implementation", None)
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if set_attention is not None and previous not in (None, "eager"):
        set_attention("eager")
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 2)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
        if set_attention is not None and previous not in (None, "eager"):
            set_attention(previous)
    return int(counter.get_total_flops())
