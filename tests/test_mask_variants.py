"""A converted HF model's blocks get their padded-mask call traced at conversion (``blocks.carry``).

transformers skips an all-ones attention mask in eager calls, so the example call gives each block
``attention_mask=None``. A padded batch, and every call under ``torch.compile``, gives it a mask tensor.
Traced only when it first came, that variant broke a compiled graph at every layer, for good. Here:
the variant exists after ``convert``; a padded batch runs it without a retrace and computes the
original's function at init and the runtime-retraced variant's numbers at perturbed parameters; the
compiled model is one graph with the eager numbers; an example without a mask adds nothing.
"""
import torch

from mhc_compile import MHCConfig, convert
from tests._convert_checks import main_output
from tests._invariants import perturb_mhc


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
ONES = torch.ones(2, 9, dtype=torch.long)
PADDED = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])


def _variants(model):
    return [len(layer.__dict__["_mhc_carry"].variants) for layer in model.encoder.layer]


def test_padded_batches_run_a_variant_traced_at_conversion():
    original = _bert()
    conv = convert(_bert(), MHCConfig(streams=4), (IDS,), example_kwargs={"attention_mask": ONES}).eval()
    assert _variants(conv) == [4, 4]  # None and a mask tensor, eval and training
    with torch.no_grad():
        want, got = main_output(original(IDS, attention_mask=PADDED)), main_output(conv(IDS, attention_mask=PADDED))
    assert _variants(conv) == [4, 4]  # no retrace
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    # perturbed: the same numbers as the variant traced at run time (converted without a mask example)
    perturb_mhc(conv, seed=4)
    late = perturb_mhc(convert(_bert(), MHCConfig(streams=4), (IDS,)), seed=4).eval()
    assert _variants(late) == [2, 2]
    with torch.no_grad():
        a, b = main_output(conv(IDS, attention_mask=PADDED)), main_output(late(IDS, attention_mask=PADDED))
        unpadded = main_output(conv(IDS, attention_mask=ONES))
    assert _variants(late) == [3, 3]
    assert (a - b).abs().max() <= 1e-6
    assert (a[1, :6] - unpadded[1, :6]).abs().max() > 1e-4  # the padding really reached the attention


def test_compiled_model_is_one_graph_with_the_eager_numbers():
    conv = perturb_mhc(convert(_bert(), MHCConfig(streams=4), (IDS,), example_kwargs={"attention_mask": ONES}),
                       seed=5).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        want = main_output(conv(IDS, attention_mask=ONES))
        explained = torch._dynamo.explain(conv)(IDS, attention_mask=ONES)
        torch._dynamo.reset()
        got = main_output(torch.compile(conv, backend="eager")(IDS, attention_mask=ONES))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert (got - want).abs().max() <= 2e-5
