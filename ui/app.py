"""Start the adaptermerge Gradio app on the demo (`python ui/app.py`); `adaptermerge ui --help` lists the options."""

from adaptermerge.cli import main

if __name__ == "__main__":
    main(["ui"])
