"""The Gradio app: a slider per adapter, a merge method with its parameters, a live preview, a heatmap, export.

`launch()` serves it (the `adaptermerge ui` verb and `python ui/app.py` call it); the page is built in `app.py`
over the in-memory state of `workbench.py`; the embedded default adds a tiny diffusion pipeline (`diffusion.py`, built
on first use). File access is limited to the folders given on the command line.
"""

from .app import build_app, launch
from .workbench import DEMO, MAX_ADAPTERS, MAX_UPLOAD_BYTES, TextPreview, Workbench, export, make_workbench, upload

__all__ = [
    "DEMO",
    "MAX_ADAPTERS",
    "MAX_UPLOAD_BYTES",
    "TextPreview",
    "Workbench",
    "build_app",
    "export",
    "launch",
    "make_workbench",
    "upload",
]
