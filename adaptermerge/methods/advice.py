"""Which method to try first, from `adaptermerge bench quality --suite all` over seeds 0-2 (plain text: no torch)."""

__all__ = ["TRY_FIRST"]

TRY_FIRST = (
    "Try first for LLM LoRAs: `tsv`. On the text suite (4 WordNet tasks on MiniLM, 3 separately trained seeds) it "
    "kept 91.1 ± 0.8 % of each task's own accuracy, above the exact sum (`linear`, 88.0 ± 2.0) and peft's best type "
    "(ties_svd, 88.4 ± 1.4) on every seed, with nothing to tune but one weight for all adapters (0.4-0.5 for 4 "
    "adapters there: pick it on held-out data). `iso_c` has a similar mean (91.5) but a wider spread (± 3.5); "
    "`ties`, `dare_*` and `knots` did not beat `linear`. To keep every adapter recoverable instead of merging, use "
    "`rmm`."
)
