"""torch.compile keeps the whole MM-DiT in one graph (issue 25): a later change cannot lose it silently."""

import torch

import sd3mini


def test_mmdit_traces_as_one_graph_without_breaks():
    config = sd3mini.MMDiTConfig(depth=2, hidden_size=64, num_heads=1, pos_embed_max_size=8, adm_in_channels=32,
                                 context_in_dim=48, qk_norm=True, x_block_self_attn_layers=(0,))
    model = sd3mini.MMDiT(config).eval()
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([1000.0, 250.0])
    y, context = torch.randn(2, 32), torch.randn(2, 7, 48)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x, t, y, context)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
