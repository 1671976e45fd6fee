"""Start the adaptermerge Gradio app: `python ui/app.py [--host ...] [--port ...] [--base ...] [--adapters DIR]`.

The app itself lives in `adaptermerge.ui` so the installed `adaptermerge ui` command finds it; this is a launcher.
"""

import sys

from adaptermerge.cli import main

if __name__ == "__main__":
    main(["ui", *sys.argv[1:]])
