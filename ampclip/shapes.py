"""Gradient shapes of real models, shared by the demo, the benchmarks and the tests."""

from __future__ import annotations


def gpt2_shapes(d_model: int = 768, n_layer: int = 12, vocab: int = 50257, n_ctx: int = 1024) -> list[tuple]:
    """Parameter shapes of GPT-2 (124M by default: 148 tensors, 124.4M elements; tied lm_head)."""
    shapes: list[tuple] = [(vocab, d_model), (n_ctx, d_model)]
    d = d_model
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),                  # ln_1
            (d, 3 * d), (3 * d,),        # attn.c_attn
            (d, d), (d,),                # attn.c_proj
            (d,), (d,),                  # ln_2
            (d, 4 * d), (4 * d,),        # mlp.c_fc
            (4 * d, d), (d,),            # mlp.c_proj
        ]
    return shapes + [(d,), (d,)]  # ln_f


def scaled(shapes: list[tuple], divisor: int) -> list[tuple]:
    """The same tensor count with each leading dimension divided by ``divisor`` (at least 1 element)."""
    if divisor <= 1:
        return list(shapes)
    return [(max(1, s[0] // divisor), *s[1:]) for s in shapes]
