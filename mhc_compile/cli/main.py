"""The ``mhc`` command line (click): ``mhc convert``, ``mhc inspect``, ``mhc demo``.

This module owns argument parsing, the progress bar, error reporting and exit codes:
0 success, 2 usage errors (bad options, a missing input file), 1 failures (a file that cannot
be read, a model without residual adds, an output that cannot be written), 130 on Ctrl-C. Errors are one line,
``mhc: error: <file>: <what was wrong>``; ``--debug`` (before or after the command name) shows
the traceback instead. See docs/cli.md.
"""
from __future__ import annotations

import functools
import sys
import warnings
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Optional

import click

from .. import __version__
from ..report import ResidualReport
from .args import parse_config, parse_inputs, source_options

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class NoResidualsError(RuntimeError):
    """The model has no residual add to rewrite."""


# --------------------------------------------------------------------------------- plumbing
def _debug_enabled(ctx: click.Context) -> bool:
    while ctx is not None:
        if (ctx.obj or {}).get("debug") or ctx.params.get("debug"):
            return True
        ctx = ctx.parent
    return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _shorten(msg: str, limit: int = 600) -> str:
    """``msg`` cut to about ``limit`` characters at a space, never mid-word; the advice of a capture
    error (from "What to try:") is kept whole and the cause before it is cut instead."""
    head, sep, advice = msg.partition(" What to try: ")
    if len(head) > limit:
        cut = head.rfind(" ", 0, limit)
        head = head[:cut if cut > limit // 2 else limit].rstrip(" ,;:") + " ..."
    return head + sep + advice


def _echo_warnings(caught) -> None:
    """Python warnings raised during the command, each distinct message once, one line each."""
    seen = set()
    for w in caught:
        msg = _one_line(w.message)
        if msg.startswith("mhc_compile: "):
            msg = msg[len("mhc_compile: "):]
        if msg and msg not in seen:
            seen.add(msg)
            click.echo(f"mhc: warning: {msg}", err=True)


@contextmanager
def _quiet_libraries():
    """Hide what torch and transformers write to stderr while they work (log records such as
    ``W1123 ... non_strict_utils.py`` lines and logged tracebacks, and the partial graphs
    torch.export prints when a capture fails): the command reports its own one-line error or
    warnings instead. A no-op with --debug."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _debug_enabled(ctx):
        yield
        return
    import io
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _handle_errors(fn):
    """Turn exceptions into one-line messages and exit codes (tracebacks only with --debug).

    Without --debug, Python warnings are shown once each as ``mhc: warning: <message>`` (library
    deprecation warnings are dropped), and an error that names neither SRC nor the output gets
    SRC in front, so the line always says which file it is about."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        from ..config import MHCConfigError
        from ..capture import MHCCaptureError
        from ..io import MHCIOError, MHCUsageError

        debug = _debug_enabled(ctx)
        caught: list = []
        try:
            if debug:
                return fn(*args, **kwargs)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warnings.simplefilter("ignore", FutureWarning)  # library deprecation noise is not the user's business
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    return fn(*args, **kwargs)
                finally:
                    _echo_warnings(caught)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT; outputs are atomic
            _interrupted()
        except Exception as exc:
            if debug:
                raise
            usage = isinstance(exc, (MHCUsageError, MHCConfigError))
            known = isinstance(exc, (MHCIOError, MHCConfigError, NoResidualsError, MHCCaptureError))
            msg = _one_line(exc) or type(exc).__name__
            if not known:
                msg = f"{type(exc).__name__}: {msg}"
            src = kwargs.get("src")
            dst = kwargs.get("dst") or kwargs.get("out")
            if (src and not isinstance(exc, MHCConfigError) and not msg.startswith("--")
                    and str(src) not in msg and not (dst and str(dst) in msg)):
                msg = f"{src}: {msg}"
            msg = _shorten(msg)
            hint = "" if isinstance(exc, (MHCIOError, MHCConfigError, NoResidualsError)) else " (run with --debug for the traceback)"
            click.echo(f"mhc: error: {msg}{hint}", err=True)
            ctx.exit(EXIT_USAGE if usage else EXIT_FAILURE)

    return wrapper


def _debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(fn)


class _Progress:
    """A tqdm bar over named stages on stderr (hidden when stderr is not a terminal unless forced).
    While a stage runs, a thread redraws the bar every ``tick`` seconds, so its elapsed time
    moves during a long stage (the capture of a large model) instead of standing still."""

    def __init__(self, stages: list[str], enabled: Optional[bool], tick: float = 0.5):
        from tqdm import tqdm

        self.bar = tqdm(total=len(stages), file=sys.stderr, disable=(None if enabled is None else not enabled),
                        bar_format="{desc:<10} {bar} {n_fmt}/{total_fmt} [{elapsed}]", leave=False)
        self.tick = tick

    @contextmanager
    def stage(self, name: str):
        import threading

        self.bar.set_description_str(name)
        done = threading.Event()

        def redraw():
            while not done.wait(self.tick):
                self.bar.refresh()

        ticker = threading.Thread(target=redraw, daemon=True)
        if not self.bar.disable:
            ticker.start()
        try:
            yield
        finally:
            done.set()
            if ticker.is_alive():
                ticker.join()
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _read(src, *, state_dict, input_shapes, input_dtypes, trust_pickle, trust_code, batch_size, seq_len):
    """Read SRC with the source options. The current directory becomes importable (appended to
    ``sys.path``, so it shadows no installed module) only for code the user named (a factory
    SRC) or trusted (--trust-pickle, --trust-code), never for a directory's own say-so."""
    from ..io import detect_kind, read_source
    from ..io.sources.common import cwd_on_path

    shapes, dtypes = parse_inputs(input_shapes, input_dtypes)
    if trust_pickle or trust_code or detect_kind(src) == "factory":
        cwd_on_path()
    return read_source(src, state_dict=state_dict, input_shapes=shapes, input_dtypes=dtypes,
                       trust_pickle=trust_pickle, trust_code=trust_code, batch_size=batch_size, seq_len=seq_len)


# ----------------------------------------------------------------------------------- the app
class _Group(click.Group):
    """The ``mhc`` group: Ctrl-C while click parses the arguments (the group's own options, or a
    command's before its body runs) exits 130 with ``mhc: interrupted`` like Ctrl-C inside a
    command, not click's ``Aborted!`` with exit 1."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted()


def _interrupted():
    click.echo("mhc: interrupted", err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mhc")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """mhc-compile: rewrite residual networks into n-stream manifold-constrained hyper-connections.

    \b
    mhc demo                          convert and train a tiny built-in GPT (no files needed)
    mhc convert SRC -o DST            convert a saved model
    mhc inspect SRC [--format html]   show the residual sites, chains, cost and graphs
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


CONVERT_HELP = """Convert the model SRC to mHC and write it to DST.

\b
SRC is one of:
  DIR                      a Hugging Face model directory (config.json + safetensors, as
                           save_pretrained writes it); example inputs come from the config:
                           input_ids (batch x seq-len) for text models, pixel_values
                           (batch x num_channels x image_size^2) for vision models
  FILE.pt2                 a torch.export program (torch.export.save); its example inputs
  package.module:function  a factory returning an nn.Module; weights with --state-dict;
                           example inputs from --input-shape/--input-dtype, else from an
                           example_inputs() function in the same module (returning a tensor,
                           a tuple of tensors, or (args, kwargs))
  FILE.pt                  a whole pickled nn.Module: needs --trust-pickle (unpickling runs
                           code), plus --input-shape/--input-dtype

\b
DST is a directory (config.json / mhc.json / model.safetensors / example_inputs.safetensors;
read it back with mhc_compile.load(DST)), or, when it ends in .pt2, a re-exported torch.export
program with the new parameters. DST is written atomically: to a temporary path next to it,
then renamed.

\b
Examples:
  mhc convert ./gpt2-small -o ./gpt2-mhc --streams 4
  mhc convert model.pt2 -o model-mhc.pt2 -c sinkhorn_iters=10
  mhc convert mypkg.models:tiny --state-dict w.pt --input-shape 2x16 --input-dtype long -o out
"""


@cli.command(help=CONVERT_HELP, short_help="Convert a saved model to mHC.")
@click.argument("src")
@click.option("-o", "--output", "dst", required=True, type=click.Path(), metavar="DST",
              help="Where to write the converted model: a directory, or a FILE.pt2.")
@click.option("--streams", "-n", type=int, default=None, help="Number of residual streams n (default 4).")
@click.option("--config-option", "-c", "config_options", multiple=True, metavar="KEY=VALUE",
              help="Any MHCConfig field, e.g. -c sinkhorn_iters=10 -c init=paper (repeatable).")
@source_options
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
@_debug_option
@_handle_errors
def convert(src, dst, streams, config_options, progress, debug, **source_options):
    from ..io import MHCUsageError, check_destination, detect_kind, save_converted
    from ..pipeline import analyze_example, convert_analyzed

    config = parse_config(streams, config_options)
    kind = detect_kind(src)
    if kind == "converted":
        raise MHCUsageError(f"{src}: is already an mhc output; convert the original model instead")
    to_pt2 = str(dst).endswith(".pt2")
    check_destination(dst, is_dir=not to_pt2)  # before any work on the model

    bar = _Progress(["load", "capture", "rewrite", "save"], progress)
    try:
        with bar.stage("load"), _quiet_libraries():
            source = _read(src, **source_options)
        with bar.stage("capture"), _quiet_libraries():  # the one pipeline of mhc_compile.convert, in two stages
            analysis = analyze_example(source.model, config, source.args, source.kwargs)
        with bar.stage("rewrite"), _quiet_libraries():
            # a .pt2 is one exported program: the whole-graph form, exported again by save_converted
            conversion = convert_analyzed(analysis, config, form="whole-graph" if to_pt2 else "auto")
        converted, report = conversion.converted, conversion.report
        if not conversion.rewritten:
            raise NoResidualsError(f"{src}: no residual add x + f(x) found, nothing to convert ({_why_none(report)})")
        with bar.stage("save"), _quiet_libraries():
            out = save_converted(converted, dst, source, config, report=report.to_dict())
    finally:
        bar.close()
    click.echo(f"converted {src} ({source.kind}): {report.num_sites} residual sites, n={config.streams} streams -> {out}")


def _why_none(report: ResidualReport) -> str:
    if report.native:
        return "; ".join(n.message for n in report.native)
    if report.not_taken:
        return f"{len(report.not_taken)} adds seen, none is a residual"
    return "the graph has no add of same-shaped tensors"


FORMATS = ("text", "json", "dot", "svg", "html")
_FORMAT_OF_SUFFIX = {".json": "json", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".html": "html", ".htm": "html"}


@cli.command(short_help="Show the residual sites, chains, cost and graphs of a model.")
@click.argument("src")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="text: tables; json: the same as data; dot/svg: the graph before and after the rewrite "
                   "(svg needs Graphviz); html: a self-contained report with the SVG embedded when Graphviz is installed. "
                   "Default: from the -o file's extension (.json, .dot, .gv, .svg, .html, .htm), else text.")
@click.option("-o", "--output", "out", type=click.Path(), default=None, metavar="FILE", help="Write to FILE (atomically) instead of stdout.")
@click.option("--force", "-f", is_flag=True, help="Overwrite FILE of -o when it exists.")
@click.option("--streams", "-n", type=int, default=None, help="Number of residual streams n (default 4; ignored for converted models).")
@click.option("--config-option", "-c", "config_options", multiple=True, metavar="KEY=VALUE", help="Any MHCConfig field.")
@source_options
@_debug_option
@_handle_errors
def inspect(src, fmt, out, force, streams, config_options, debug, **source_options):
    """Show the residual sites of SRC (any source of `mhc convert`, or its output), the chains,
    the adds not taken and why, the parameters added, the estimated cost, and the graphs.

    \b
    Cost per site and token (n streams, C features, b bytes per element of the model dtype):
      coeffs reads nC, 2*nC*(2n+n^2) FLOPs (projection); pre reads nC writes C;
      post_res reads (n+1)C writes nC  ->  b*C*(4n+2) bytes, b*C*(4n-1) more than the plain add.
    """
    from . import render as rp

    if fmt is None:
        fmt = _FORMAT_OF_SUFFIX.get(Path(out).suffix.lower(), "text") if out else "text"
    from ..io import MHCIOError, check_destination

    if fmt == "svg" and not rp.svg_available():  # fail before the (slow) capture
        raise MHCIOError(f"{src}: cannot write --format svg: {rp.GRAPHVIZ_HELP}")
    if out:  # before the capture, too
        if Path(out).is_file() and not force:
            raise MHCIOError(f"{out}: exists; pass --force to overwrite it")
        check_destination(out, is_dir=False)
    with _quiet_libraries():
        text = _inspect_text(src, fmt, streams, config_options, source_options)
    if out:
        from ..io import atomic_write_text

        atomic_write_text(out, text)
        click.echo(f"wrote {fmt} report of {src} to {out}", err=True)
    else:
        click.echo(text, nl=False)


def _inspect_text(src, fmt, streams, config_options, source_options) -> str:
    """The inspect report of ``src`` in format ``fmt``, as text. The model is captured once:
    the report, the converted module and the graph before the rewrite come from one conversion."""
    from . import render as rp
    from ..io import MHCIOError
    from ..pipeline import rewrite_whole

    graphs_wanted = fmt not in ("text", "json")
    source = _read(src, **source_options)
    before = None  # the graph before the rewrite
    if source.kind == "converted":
        config = parse_config(None, (), source.mhc.get("mhc_config"))
        if streams is not None or config_options:
            warnings.warn(f"{src} is already converted (n={config.streams}): --streams and --config-option "
                          "are ignored; inspect shows the configuration it was converted with")
        converted = source.converted
        if source.conversion is None:  # a .pt2: the original graph is not in the file: stored report
            stored = source.mhc.get("report")
            if stored is None:
                raise MHCIOError(f"{src}: mhc.json has no residual report; re-run `mhc convert` on the original")
            report, original = ResidualReport.from_dict(stored), None
        else:  # a directory: read rebuilt and converted the original
            report, original, before = source.conversion.report, source.model, source.conversion.original_graph
    else:
        config = parse_config(streams, config_options)
        conversion = rewrite_whole(source.model, config, source.args, source.kwargs, keep_graph=graphs_wanted)
        report, original, before = conversion.report, source.model, conversion.original_graph
        converted = conversion.converted if report.num_sites else None
    view = rp.build_view(report, config, original, converted)
    view["source"] = f"{src} ({source.kind})"

    if fmt == "text":
        text = rp.to_text(view) + "\n"
    elif fmt == "json":
        text = rp.to_json(view) + "\n"
    else:
        graphs = []
        if original is not None:
            graphs.append(("before", _graph_of(original, before)))
        if converted is not None:
            graphs.append(("after (mHC)", _graph_of(converted, None)))
        dot_text = rp.graph_to_dot(graphs, view)
        if fmt == "dot":
            text = dot_text
        else:
            svg = rp.render_svg(dot_text)
            if fmt == "svg":
                if svg is None:
                    raise MHCIOError(f"{src}: cannot write --format svg: {rp.GRAPHVIZ_HELP}")
                text = svg
            else:
                text = rp.to_html(view, svg=svg, dot_text=dot_text)
    return text


def _graph_of(module, captured):
    """The FX graph of ``module``: its own graph for a GraphModule, else ``captured``, the graph of
    the capture convert made of it (so node names match the report's)."""
    import torch

    if isinstance(module, torch.fx.GraphModule):
        return module.graph
    if captured is None:
        raise RuntimeError(f"no captured graph of {type(module).__name__} to draw")
    return captured


@cli.command(short_help="Convert and train a tiny built-in GPT (no files needed).")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="AdamW steps.")
@click.option("--streams", "-n", default=4, show_default=True, help="Residual streams n.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="torch threads while the demo runs (tiny tensors: one thread is fastest; 0 = leave as is).")
@_debug_option
@_handle_errors
def demo(steps, streams, seed, threads, debug):
    """Convert a tiny built-in GPT (C=64, L=4), show its residual sites, train it a few steps on
    CPU and print the loss and the stability gains (Amax gain of the composite H_res)."""
    from .demo import run_demo

    run_demo(steps=steps, streams=streams, seed=seed, echo=click.echo, threads=threads or None)


def main() -> None:  # pragma: no cover - python -m mhc_compile.cli.main
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
