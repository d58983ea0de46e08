from rankdyna_trainer.export import LowRankLinear
from rankdyna_trainer.flops import forward_flops
from rankdyna_trainer.targets import set_submodule
from tests.conftest import tiny_bert


def hand_count(batch, seq, hidden=32, ffn=64, layers=2, labels=2, ranks=None):
    """2 FLOPs per multiply-add: q, k, v, o (hidden x hidden) and the two FFN matrices on every token, the
    attention scores and weighted values (2 matmuls of seq x seq x hidden per sequence), then pooler and head
    on one vector per sequence."""
    tokens = batch * seq
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn
    if ranks:  # every layer's query replaced by a rank-r pair: r * (in + out) instead of in * out
        per_layer += ranks * (hidden + hidden) - hidden * hidden
    linear = 2 * tokens * per_layer * layers
    attention = 2 * (2 * batch * seq * seq * hidden) * layers
    head = 2 * batch * (hidden * hidden + hidden * labels)
    return linear + attention + head


def test_forward_flops_matches_the_hand_count_and_keeps_sdpa():
    model = tiny_bert()
    model.set_attn_implementation("sdpa")
    assert forward_flops(model, batch_size=2, seq_len=16) == hand_count(2, 16) == 1_184_000
    assert model.config._attn_implementation == "sdpa"  # restored after the eager count
    assert forward_flops(model, batch_size=1, seq_len=48) == hand_count(1, 48)


def test_forward_flops_counts_low_rank_factors():
    model = tiny_bert()
    for i in range(2):
        set_submodule(model, f"bert.encoder.layer.{i}.attention.self.query", LowRankLinear(32, 4, 32))
    assert forward_flops(model, batch_size=2, seq_len=16) == hand_count(2, 16, ranks=4)
    assert forward_flops(model, 2, 16) < forward_flops(tiny_bert(), 2, 16)
