"""torchtitan's own tensor-parallel plan on a converted Llama3 (gloo, 2 CPU ranks) equals one process.

Each TP rank: torchtitan 0.3.0's Llama3 (flex attention, tiny sizes), its config given torchtitan's
Llama3 sharding (``set_llama3_sharding_config``, what the trainer's ``update_from_config`` does) for ``tensor_parallel_degree=2`` and
``enable_sequence_parallel``: its SequenceParallel norms and sequence-sharded activations, a
vocab-sharded ``lm_head`` whose logits feed torchtitan's own loss-parallel ``cross_entropy_loss``),
built on the meta device -> ``mhc_compile.convert`` -> torchtitan's own ``parallelize_llama`` ->
``to_empty`` -> ``init_weights``. No ``parallelize_mhc`` call: the converted model's mHC containers
declare torchtitan's ``sharding_config`` (the norm weights' layout), so torchtitan's own
``Module.parallelize`` replicates them on the TP mesh. Both TP ranks see the whole batch.

The single-process reference is the same model without parallelize. Both load the same weights
with the mHC parameters perturbed (+ N(0, 0.3), seeded). Asserted: the losses of 3 AdamW steps
(rel 1e-5), every first-step gradient (mHC included,
relative 1e-4 per tensor with ``test_tensor_parallel._rel``'s floor, and the whole mHC gradient vector), the final parameters, and that
every mHC parameter is bit-equal on the two TP ranks after the steps. Run for the ``spmd_backend``s
``partial_dtensor`` (SP on and off) and ``full_dtensor`` (SP; the inputs wrapped as torchtitan's
Trainer does). torchtitan's default ``spmd_types``: one rank equals one process, and on 2 TP ranks
its ``Module.parallelize`` types every mHC parameter like the norm weights (without the containers'
``sharding_config`` they stay untyped); training it on 2 ranks stops in torch 2.13's
``fully_shard``, for torchtitan's unconverted Llama3 too.

CPU patches torchtitan needs on gloo (test-side only, as in ``test_titan_meta_flow``): device type
"cpu", flex attention as dense SDPA over the BlockMask's own mask function, forced-sum reduction.
"""
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from models.titan_llama3 import require_torchtitan  # noqa: E402

require_torchtitan()
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

from test_tensor_parallel import _mhc_vector, _rel  # noqa: E402  (per-tensor rel error with its floor)
from test_titan_meta_flow import SEQ, _full, _load_full, _patch_titan_for_cpu, _reference_state  # noqa: E402

TP, BATCH, STEPS = 2, 2, 3


def _parallelism(backend: str, sp: bool, world: int):
    from torchtitan.config import ParallelismConfig

    return ParallelismConfig(tensor_parallel_degree=world, enable_sequence_parallel=sp, spmd_backend=backend)


def _converted(parallelism):
    """torchtitan's recipe up to parallelize: its sharding config for the parallelism -> meta build
    -> convert; (model, mesh-built ParallelDims)."""
    import mhc_compile
    from models.titan_llama3 import flex_masks, tiny_llama3_config
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    config = tiny_llama3_config("flex")
    # what Llama3Model.Config.update_from_config(config=<trainer config>) does for the parallelism;
    # called directly because update_from_config imports torchtitan.trainer (tensorboard, not installed)
    set_llama3_sharding_config(config, enable_sp=parallelism.enable_sequence_parallel)
    with torch.device("meta"):
        meta = config.build()
    model = mhc_compile.convert(meta, mhc_compile.MHCConfig(streams=2, kernels="reference"),
                                (torch.zeros(2, SEQ, dtype=torch.long),),
                                example_kwargs={"attention_masks": flex_masks(meta, 2, SEQ)})
    model.verify_module_protocol()
    dist_utils.set_spmd_backend(parallelism.spmd_backend)  # as torchtitan's Trainer does
    dims = ParallelDims.from_config(parallelism, parallelism.tensor_parallel_degree)
    dims.build_mesh()
    return model, dims


def _build(parallelism, dump: str):
    """... -> torchtitan's own parallelize_llama -> to_empty -> init_weights; (model, ParallelDims)."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.models.llama3 import parallelize_llama

    model, dims = _converted(parallelism)
    model = parallelize_llama(model, parallel_dims=dims,
                              training=TrainingConfig(mixed_precision_param="float32",
                                                      mixed_precision_reduce="float32"),
                              parallelism=parallelism, compile_config=CompileConfig(enable=False),
                              ac_config=None, dump_folder=dump)
    if parallelism.spmd_backend != "spmd_types":  # the old advice, parallelize_mhc beside it, raises
        from mhc_compile import MHCParallelError, parallelize_mhc

        with pytest.raises(MHCParallelError, match="needs no parallelize_mhc"):
            parallelize_mhc(model, dims.get_mesh("tp"), sequence_parallel=parallelism.enable_sequence_parallel)
    for m in model.modules():  # gloo has no PREMUL_SUM (test-side CPU patch)
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=None)
    return model, dims


def _inputs(dims, backend: str):
    """What torchtitan's Trainer.post_dataloading_process does to a batch for ``backend``."""
    def prepare(x, y, kwargs):
        if backend == "full_dtensor":
            from torchtitan.distributed import full_dtensor

            return full_dtensor.parallelize_inputs(dims, x, y, kwargs)
        return x, y, kwargs
    return prepare


def _train(model, prepare=lambda x, y, kwargs: (x, y, kwargs)) -> dict:
    from models.titan_llama3 import flex_masks
    from torchtitan.components.loss import cross_entropy_loss

    gen = torch.Generator().manual_seed(11)
    # eps 1e-6 and the gradient floor of test_tensor_parallel._rel: at the first site the n streams
    # are copies, so b_pre/b_res gradients are zero in exact arithmetic (norms 8e-13 .. 2e-8 here)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6, foreach=True)
    masks = flex_masks(model, BATCH, SEQ)
    losses, grads = [], {}
    for step in range(STEPS):
        data = torch.randint(0, 256, (BATCH, SEQ + 1), generator=gen)
        x, y, kwargs = prepare(data[:, :-1], data[:, 1:], {"attention_masks": masks})
        loss = cross_entropy_loss(model(x, **kwargs), y) / y.numel()  # torchtitan's own loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        losses.append(float(_full(loss)))
    return {"losses": losses, "grads": grads, "params": {n: _full(p) for n, p in model.named_parameters()},
            "mhc_local": {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
                          for n, p in model.named_parameters() if ".mhc" in n},
            "mhc_kinds": sorted({type(p).__name__ for n, p in model.named_parameters() if ".mhc" in n})}


def _run(rank: int, world: int, out_dir: str, backend: str, sp: bool) -> None:
    _patch_titan_for_cpu()
    torch.set_num_threads(1)
    if not backend:  # the one-process reference: no parallelize
        from models.titan_llama3 import tiny_llama3_config

        import mhc_compile
        from models.titan_llama3 import flex_masks

        with torch.device("meta"):
            meta = tiny_llama3_config("flex").build()
        model = mhc_compile.convert(meta, mhc_compile.MHCConfig(streams=2, kernels="reference"),
                                    (torch.zeros(2, SEQ, dtype=torch.long),),
                                    example_kwargs={"attention_masks": flex_masks(meta, 2, SEQ)})
        model.to_empty(device="cpu")
        model.init_weights(buffer_device=None)
        prepare = _inputs(None, "")
    else:
        model, dims = _build(_parallelism(backend, sp, world), out_dir)
        prepare = _inputs(dims, backend)
    _load_full(model, _reference_state())
    out = _train(model, prepare)
    torch.save(out, os.path.join(out_dir, f"out{world}_{rank}.pt"))


def _worker(rank: int, world: int, out_dir: str, backend: str, sp: bool) -> None:
    from _gloo import gloo_group

    with gloo_group(rank, world, out_dir):
        _run(rank, world, out_dir, backend, sp)


@pytest.fixture(scope="module")
def single():
    """The one-process run (no parallelize), shared by every case."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_run, args=(1, d, "", False), nprocs=1, join=True)
        return torch.load(os.path.join(d, "out1_0.pt"), weights_only=True)


def _compare(single: dict, backend: str, sp: bool, world: int = TP) -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, d, backend, sp), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, f"out{world}_{r}.pt"), weights_only=True) for r in range(world)]
        ranks += ranks[:1]  # one rank: compared with itself
    multi = ranks[0]
    worst_grad = max(_rel(multi["grads"][n], g) for n, g in single["grads"].items())
    worst_mhc = max(_rel(multi["grads"][n], g) for n, g in single["grads"].items() if ".mhc" in n)
    whole_mhc = _rel(_mhc_vector(multi["grads"]), _mhc_vector(single["grads"]))
    worst_param = max(float((multi["params"][n] - p).abs().max()) for n, p in single["params"].items())
    drift = max(float((ranks[1]["mhc_local"][n] - v).abs().max()) for n, v in multi["mhc_local"].items())
    print(f"titan TP={world} {backend} sp={sp}: mHC params {multi['mhc_kinds']}; losses single {single['losses']} "
          f"TP {multi['losses']}; worst grad rel {worst_grad:.3g} (mHC {worst_mhc:.3g}, "
          f"whole mHC vector {whole_mhc:.3g}); "
          f"max |param diff| {worst_param:.3g}; mHC drift across TP ranks {drift:.3g}")
    assert multi["mhc_kinds"] == ["DTensor"]
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert set(multi["grads"]) == set(single["grads"])
    assert worst_grad <= 1e-4 and worst_mhc <= 1e-4 and whole_mhc <= 1e-5
    assert worst_param <= 1e-4
    assert drift == 0.0


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no_sp"])
def test_titan_parallelize_llama_tp_equals_one_process(single, sp):
    _compare(single, "partial_dtensor", sp)


@pytest.mark.parametrize("backend", ["full_dtensor"])
def test_titan_full_dtensor_backend_tp_sp_equals_one_process(single, backend):
    _compare(single, backend, True)


def test_titan_default_spmd_types_backend_one_rank_equals_one_process(single):
    """torchtitan's default backend on one rank (its only layout torch 2.13's fully_shard takes: with
    more ranks it wants DTensor parameters, for torchtitan's own unconverted Llama3 too)."""
    _compare(single, "spmd_types", False, world=1)


def _annotate_worker(rank: int, world: int, out_dir: str) -> None:
    from _gloo import gloo_group
    from spmd_types.runtime import get_local_type, has_local_type

    with gloo_group(rank, world, out_dir):
        _patch_titan_for_cpu()
        model, dims = _converted(_parallelism("spmd_types", True, world))
        model.parallelize(dims)  # parallelize_llama's first step under spmd_types
        norm = get_local_type(model.layers["0"].attention_norm.weight)
        untyped = [n for n, p in model.named_parameters() if not has_local_type(p)]
        mhc = {n: get_local_type(p) == norm for n, p in model.named_parameters() if ".mhc" in n and has_local_type(p)}
        torch.save({"untyped": untyped, "mhc": mhc}, os.path.join(out_dir, f"types{rank}.pt"))


def test_titan_spmd_types_tp_types_every_mhc_parameter_like_the_norms():
    """On 2 TP ranks (SP) torchtitan's spmd_types ``Module.parallelize`` gives every parameter an
    SPMD type, each mHC one the norm weights' type (``R`` on tp). Training stops later, in torch
    2.13's ``fully_shard`` ("all parameters must be DTensors"), for torchtitan's unconverted
    Llama3 too: that backend needs a newer torch."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_annotate_worker, args=(TP, d), nprocs=TP, join=True)
        out = torch.load(os.path.join(d, "types0.pt"), weights_only=True)
    print(f"spmd_types TP={TP}: untyped parameters {out['untyped']}; {len(out['mhc'])} mHC parameters typed")
    assert out["untyped"] == []
    assert len(out["mhc"]) > 0 and all(out["mhc"].values())
