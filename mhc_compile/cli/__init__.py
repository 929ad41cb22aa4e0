"""The ``mhc`` command line (click).

``main``: the app and its commands (``mhc convert``, ``mhc inspect``, ``mhc demo``), errors and
exit codes. ``args``: parsing the options' text (shapes, dtypes, config options) into typed
values. ``render``: the inspect view and its text/JSON/DOT/SVG/HTML renderers and cost model.
``demo``: the tiny built-in GPT and the demo run. Reading sources and saving/loading converted
models lives in ``mhc_compile.io``. See docs/cli.md.
"""
