"""mhc_compile.convert on tiny Hugging Face transformers models built from configs (no download):
GPT-2, Llama, BERT, ViT, ResNet, ConvNeXt, T5. Same checks as the hand-written zoo: exact
site/chain counts, function preservation at init (also at other batch/sequence sizes),
training, symmetry breaking, and a state_dict round trip."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig  # noqa: E402
from tests._convert_checks import (  # noqa: E402, F401 (one_thread: autouse fixture)
    check_training_breaks_symmetry, mhc_params, one_thread, rel_err, state_dict_roundtrip,
)
from tests.models.hf import HF_FAMILIES  # noqa: E402

CFG = MHCConfig(streams=4)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(HF_FAMILIES))
def test_hf_family(name):
    build, ex, other, n_sites, n_chains = HF_FAMILIES[name]
    torch.manual_seed(0)
    model = build()
    ex_in, other_in = ex(), other()
    cm = mhc_compile.convert(model, CFG, ex_in)
    rep = cm.mhc_report
    assert (rep.num_sites, rep.num_chains) == (n_sites, n_chains), str(rep)
    assert set(model.state_dict()) <= set(cm.state_dict())
    assert len(mhc_params(cm)) == 5 * n_sites

    with torch.no_grad():
        for inputs in (ex_in, other_in):
            assert rel_err(cm(*inputs), model(*inputs)) <= 1e-5

    trained = check_training_breaks_symmetry(cm, ex_in)

    torch.manual_seed(1)
    fresh = mhc_compile.convert(build(), CFG, ex_in)
    assert state_dict_roundtrip(trained, fresh, other_in) == 0.0


@pytest.mark.filterwarnings("ignore")
def test_hf_keyword_inputs_attention_mask():
    from tests.models.hf import hf_gpt2

    model = hf_gpt2()
    ids, mask = torch.randint(0, 64, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    cm = mhc_compile.convert(model, CFG, (ids,), example_kwargs={"attention_mask": mask})
    assert cm.mhc_report.num_sites == 4
    ids2, mask2 = torch.randint(0, 64, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    mask2[2, 3:] = 0
    with torch.no_grad():
        for i, m in ((ids, mask), (ids2, mask2)):
            assert rel_err(cm(i, attention_mask=m), model(i, attention_mask=m)) <= 1e-5
