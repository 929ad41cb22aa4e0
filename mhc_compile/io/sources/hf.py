"""The ``hf`` source kind: a Hugging Face model directory (``config.json`` + safetensors weights,
as ``save_pretrained`` writes it).

Read: the architecture named in config.json, built with its weights, in eval mode, with example
inputs from the config (:func:`~mhc_compile.io.examples.hf_example_inputs`) and ``use_cache``
off (the capture of ``mhc convert``'s graph cannot return a cache). A converted directory keeps
config.json (marked so that plain transformers refuses it, ``io.hub``) and generation_config.json;
rebuilding loads the architecture with the class's own ``from_pretrained`` (transformers' key
mapping, the config's own ``use_cache``: ``mhc_compile.load`` returns the class, whose blocks
take the cache), and ``io.load`` adds the mHC weights. ``save_pretrained`` of a converted model
writes the same kind of directory (``io.pretrained``).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from torch import nn

from ..errors import MHCIOError, first_line
from ..examples import hf_example_inputs
from ..format import MHC_JSON
from ..hub import mark_config, original_config
from ..registry import UNEXPECTED, ReadOptions, Source, SourceKind

CONFIG_FILES = ("config.json", "generation_config.json")  # copied into a converted directory


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' info logging and its weight-loading progress bars."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover - transformers missing
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        try:
            hf_logging.enable_progress_bar()
        except Exception:  # pragma: no cover
            pass


def _require_transformers(path: str):
    try:
        import transformers
    except ImportError:
        raise MHCIOError(f"{path}: reading Hugging Face models needs `pip install transformers`") from None
    return transformers


def _hf_class(transformers, config, path: str):
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls, arch
    if archs:
        raise MHCIOError(f"{path}: architecture {archs[0]!r} from config.json is not in transformers {transformers.__version__}")
    return transformers.AutoModel, "AutoModel"


def _hf_config(path: str, no_cache: bool = True, converted: bool = False):
    """The model config of an HF directory; of a converted one (``converted``) with the mark that
    keeps plain transformers away undone (``io.hub``)."""
    transformers = _require_transformers(path)
    try:
        with quiet_transformers():
            if converted:
                original = original_config(Path(path) / "config.json")
                config = transformers.CONFIG_MAPPING[original["model_type"]].from_dict(original)
            else:
                config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise MHCIOError(f"{path}/config.json: cannot read the model config: {first_line(exc)}") from None
    if no_cache and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache in the outputs cannot be captured by torch.export
    return transformers, config


def _check_weight_files(path: str) -> None:
    """Open every safetensors file of an HF directory, so a corrupt one is named in the error
    (transformers' own message names neither the file nor what is wrong with it)."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise MHCIOError(f"{f}: not a readable safetensors file: {first_line(exc)}") from None


def _hf_build(transformers, config, path: str, weights: bool) -> tuple[nn.Module, str]:
    cls, arch = _hf_class(transformers, config, path)
    if weights:
        _check_weight_files(path)
    try:
        with quiet_transformers():
            if weights:
                model = cls.from_pretrained(path, config=config)
            elif cls is transformers.AutoModel:
                model = cls.from_config(config)
            else:
                model = cls(config)
    except Exception as exc:
        raise MHCIOError(f"{path}: cannot build {arch} from config.json and its weights: {first_line(exc)}") from None
    return model.eval(), arch


def detect(src: str) -> bool:
    p = Path(src)  # a converted hf directory has config.json too: it is the converted kind's
    return p.is_dir() and (p / "config.json").is_file() and not (p / MHC_JSON).is_file()


def read(path: str, options: ReadOptions) -> Source:
    transformers, config = _hf_config(path)
    model, arch = _hf_build(transformers, config, path, weights=True)
    try:
        args, kwargs = hf_example_inputs(config, options.batch_size, options.seq_len)
    except MHCIOError as exc:
        raise MHCIOError(f"{path}: {exc}") from None
    meta = {"architecture": arch, "model_type": getattr(config, "model_type", None), "config_overrides": {"use_cache": False}}
    return Source("hf", path, model, args, kwargs, meta)


def save_extras(source: Source, directory: Path) -> None:
    for name in CONFIG_FILES:
        if (Path(source.path) / name).is_file():
            shutil.copy2(Path(source.path) / name, directory / name)
    if (directory / "config.json").is_file():
        mark_config(directory / "config.json")  # plain transformers refuses it, naming mhc_compile.load




def rebuild(directory: Path, meta: dict, options: ReadOptions) -> nn.Module:
    """The original model *with its saved weights*, loaded by the class's own ``from_pretrained``:
    transformers maps the checkpoint's key names to the module's (``block_sparse_moe.experts.0.w1``
    to ``mlp.experts.gate_up_proj``, ``embed_out`` to ``lm_head``, ...), which a second copy of that
    mapping here would lag behind. The mHC weights are the keys it does not take (recorded on the
    model as ``_mhc_unexpected_keys``); ``io.load`` loads them after converting."""
    transformers, config = _hf_config(str(directory), no_cache=False, converted=True)  # caches work
    for k, v in ((meta.get("rebuild") or {}).get("config_overrides") or {}).items():
        if k != "use_cache":
            setattr(config, k, v)
    cls, arch = _hf_class(transformers, config, str(directory))
    _check_weight_files(str(directory))
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(directory), config=config, output_loading_info=True)
    except Exception as exc:
        raise MHCIOError(f"{directory}: cannot build {arch} from config.json and its weights: {first_line(exc)}") from None
    wrong = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if wrong:
        raise MHCIOError(f"{directory}: the saved weights do not fit {arch}: missing or mismatched "
                         f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    model.__dict__[UNEXPECTED] = set(info.get("unexpected_keys") or ())
    return model.eval()


def register_output_types(meta: dict) -> None:
    """Import the transformers model class a converted program came from (``rebuild.architecture``
    in its mhc.json): its ModelOutput classes register their pytree serialisation names on import,
    which deserialising needs. Only a class of the installed ``transformers`` package, by name."""
    arch = (meta.get("rebuild") or {}).get("architecture")
    if not (isinstance(arch, str) and arch.isidentifier()):
        return
    try:
        import transformers
        import transformers.modeling_outputs  # noqa: F401

        getattr(transformers, arch, None)
    except Exception:  # best effort; the load reports what is missing
        pass


KIND = SourceKind(
    "hf", detect, read, save_extras, rebuild, rebuild_loads_weights=True,
    description="a Hugging Face model directory (config.json + safetensors weights)",
)
