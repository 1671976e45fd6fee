"""The `concept-tokens` setting of bench_training.py: new concept tokens read through cross-attention LoRAs.

The regime orthogonal adaptation was made for (Mix-of-Show's ED-LoRA, DreamBooth): each concept brings its own new
token, whose embedding is trained together with a LoRA on the layers that read token features (`to_k`, `to_v`).

Model: a tiny text-conditioned digit detector. An image encoder (`64 → 64`, ReLU) gives a query `to_q(f(x))`; the
prompt `[<a>, <photo>, <word>]` (embeddings of width 64) gives keys `to_k(e)` and values `to_v(e)`; one attention
read-out `o = softmax(q kᵀ / 8) v` goes through `head` to a score: "is this image a <word>?". Pre-trained on words
for digits 0-5 (positives: the word's digit; negatives: the same images under another word), with an auxiliary
ten-class loss on the encoder so it tells all ten digits apart, as a general image backbone would.

Concepts: four new tokens `<c6> … <c9>`, one per digit 6-9, which the base vocabulary has no word for. Each is
initialised at random at the scale of the base vocabulary's entries (Mix-of-Show's `<rand-0.013>`: the typical
entry size of CLIP's embedding table), one draw per concept, and trained with its LoRA on that digit's images
(positives) and as many other digits (negatives), images the base model never saw. Every method trains the token
embedding and a LoRA on `to_k` and `to_v` with the same steps and learning rate:

- plain: rank 4, peft's default initialisation, `lora_A` and `lora_B` trained;
- OSRM (mean / covariance): rank 4, `lora_A` initialised orthogonal to the other concepts' prompt statistics on the
  pre-trained model (their prompts with the initial token embeddings), both factors trained;
- orthogonal: rank 4, `lora_A` frozen to the concept's block of the shared orthogonal basis, `lora_B` trained. The
  rank is the same as plain's (as in Mix-of-Show and the paper), so it trains half as many LoRA parameters.

The adapters are summed (`linear` merge, weight 1) and every concept's token is added to the vocabulary. Task `j` is
read with its own token: `f_j` is the backbone with adapter `j` and token `j`, `f_merged` the summed model with
token `j`, `f_0` the backbone with token `j`'s initial embedding (what the concept's training started from).

Choices, made on the adapters alone before looking at merges: the prompt tokens are layer-normed (a text encoder's
final norm) and the detector is pre-trained with AdamW (lr 1e-3, weight decay 0.1); without them the base attention
was so sharp that new tokens often never took over (individual accuracy 0.5). LoRA lr 1e-3 for every method: at 1e-2
the plain LoRAs (whose `lora_A` entries are about `1 / sqrt(768)`) failed to train alone (0.50-0.63 on 4 seeds).

Measured (4 seeds, 300 steps, benchmarks/README.md): alone, every method reaches 0.95-0.96; summed, orthogonal
adaptation keeps 0.94 with cross-task change 0.14, plain LoRAs fall to 0.85 with 0.38, and OSRM (whose statistics
are taken on the untrained tokens) to 0.72-0.78. Most of the plain LoRAs' crosstalk passes through the shared
context tokens, which their trained `lora_A` learns to read (seed 0: 0.41 of 0.43 when only the context tokens see
the other adapters); a frozen random block reads them with `sqrt(r / d) ≈ 0.07` of their norm, while the concept's
token grows into its own block (seed 0: 0.44 of its norm in its own block, 0.11 in the other three together).
Over 8 seeds (plain and orthogonal only): merged 0.933 ± 0.018 against 0.819 ± 0.061, higher on every seed (by
0.05-0.21); cross-task change 0.108 ± 0.065 against 0.375 ± 0.068, at most 0.55 of plain's on every seed.

The width matters: at `dim=64` (`r / d = 1 / 16`, 4 seeds) orthogonal adaptation still lowers the cross-task change
(0.13-0.70 against 0.27-0.77) but merges no better (0.63-0.87 against 0.61-0.87).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adaptermerge import Adapter, merge_adapters
from adaptermerge.training import OSRM, BasisAllocator

try:  # imported as benchmarks._concept_tokens, or beside bench_training run as a script
    from benchmarks._lora import as_adapter, lora_model, with_update
except ImportError:
    from _lora import as_adapter, lora_model, with_update

DIM = 768  # token embedding and attention width: CLIP ViT-L's text width, as in Stable Diffusion 1.x
RANK = 4
BASE_WORDS = tuple(range(6))  # the base vocabulary has a word for digits 0-5 ...
CONCEPTS = (6, 7, 8, 9)  # ... and each concept is a new token for one of the others
CONTEXT = (0, 1)  # "<a> <photo>": the vocabulary ids of the shared context tokens
TARGETS = ("to_k", "to_v")
EMBEDDING_LR = 1e-1
WEIGHT_DECAY = 0.1
PRETRAIN_LR = 1e-3


class CrossAttentionDetector(nn.Module):
    """Score "is image `x` a <word>?" from one cross-attention read-out of the prompt's token features."""

    def __init__(self, dim: int = DIM, *, width: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.vocabulary = nn.Embedding(len(CONTEXT) + len(BASE_WORDS), dim)
        self.encoder = nn.Linear(64, width)
        self.to_q = nn.Linear(width, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, 1)
        self.classify = nn.Linear(width, 10)  # auxiliary pre-training head, unused by the detector

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x))

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """`x` `(n, 64)`, `prompt` `(L, dim)` token embeddings shared by all images → scores `(n,)`."""
        tokens = self.tokens(prompt)
        return self.attend(x, self.to_k(tokens), self.to_v(tokens))

    def tokens(self, embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(embeddings, (self.dim,))  # as a text encoder's final layer norm

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Keys and values `(L, dim)`, or `(n, L, dim)` for a prompt per image."""
        query = self.to_q(self.features(x)).unsqueeze(1)
        attention = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(self.dim), -1)
        return self.head(attention @ values).reshape(-1)

    def prompt(self, token: torch.Tensor) -> torch.Tensor:
        """`[<a>, <photo>, token]`: the embeddings `(3, dim)` of the prompt with `token` `(dim,)`."""
        return torch.cat([self.vocabulary(torch.tensor(CONTEXT)), token.reshape(1, self.dim)])


@dataclass
class Concept:
    """One concept's detection task (balanced positives and negatives) and its token's initial embedding."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    token: torch.Tensor


def _balanced(X: torch.Tensor, labels: torch.Tensor, digit: int, generator: torch.Generator):
    positive = (labels == digit).nonzero().reshape(-1)
    negative = (labels != digit).nonzero().reshape(-1)
    negative = negative[torch.randperm(len(negative), generator=generator)[: len(positive)]]
    index = torch.cat([positive, negative])
    return X[index], torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])


def pretrain(seed: int, *, dim: int = DIM, steps: int = 300) -> tuple[CrossAttentionDetector, dict[int, Concept]]:
    """The pre-trained detector (on a third of the images) and the concepts' tasks (on the other two thirds)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    base, rest = order[: len(y) // 3], order[len(y) // 3 :]
    train, test = rest[: len(rest) * 2 // 3], rest[len(rest) * 2 // 3 :]

    torch.manual_seed(seed)
    model = CrossAttentionDetector(dim)
    Xb, yb = X[base], y[base]
    shown = yb.clone()  # each image is shown with its own word where it has one, and with a random other word
    other = torch.tensor(BASE_WORDS)[torch.randint(len(BASE_WORDS), (len(yb),), generator=generator)]
    shown[yb >= len(BASE_WORDS)] = other[yb >= len(BASE_WORDS)]
    wrong = (shown + 1 + torch.randint(len(BASE_WORDS) - 1, (len(yb),), generator=generator)) % len(BASE_WORDS)
    words = torch.cat([shown, wrong]) + len(CONTEXT)
    prompts = torch.cat([torch.tensor(CONTEXT).expand(len(words), -1), words.unsqueeze(1)], 1)  # vocabulary ids
    targets = torch.cat([(yb == shown).float(), torch.zeros(len(yb))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
        optimizer.zero_grad()
        # `attend` with each image's own prompt, computed on the vocabulary and gathered (the head is linear and
        # the attention weights sum to one, so head(Σ α v) = Σ α head(v))
        tokens = model.tokens(model.vocabulary.weight)
        features = model.features(Xb)
        query = model.to_q(features).repeat(2, 1)  # every image is shown twice
        logits = (query @ model.to_k(tokens).T / math.sqrt(dim)).gather(1, prompts)
        scores = (torch.softmax(logits, -1) * model.head(model.to_v(tokens)).reshape(-1)[prompts]).sum(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(scores, targets)
        loss = loss + nn.functional.cross_entropy(model.classify(features), yb)
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)

    scale = model.vocabulary.weight.std().item()
    concepts = {}
    for digit in CONCEPTS:
        X_train, y_train = _balanced(X[train], y[train], digit, generator)
        X_test, y_test = _balanced(X[test], y[test], digit, generator)
        token = scale * torch.randn(dim, generator=generator)
        concepts[digit] = Concept(X_train, y_train, X_test, y_test, token)
    return model, concepts


def train_concept(
    backbone: CrossAttentionDetector,
    digit: int,
    concept: Concept,
    method: str,
    *,
    osrm: OSRM | None,
    allocator: BasisAllocator,
    steps: int,
    lr: float,
) -> tuple[Adapter, torch.Tensor]:
    """One concept's LoRA (as an adaptermerge Adapter) and its trained token embedding."""
    model = lora_model(backbone, method, str(digit), rank=RANK, targets=TARGETS, osrm=osrm, allocator=allocator)
    token = nn.Parameter(concept.token.clone())
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": lora, "lr": lr}, {"params": [token], "lr": EMBEDDING_LR}])
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        scores = model(concept.X_train, backbone.prompt(token))
        nn.functional.binary_cross_entropy_with_logits(scores, concept.y_train).backward()
        optimizer.step()
    return as_adapter(model, f"c{digit}"), token.detach()


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return ((scores > 0).float() == labels).float().mean().item()


def evaluate(
    backbone: CrossAttentionDetector,
    trained: dict[int, tuple[Adapter, torch.Tensor]],
    concepts: dict[int, Concept],
) -> dict[str, float]:
    """Base/own/merged accuracy and cross-task output change, averaged over concepts (each read with its token)."""
    merged = with_update(backbone, merge_adapters([adapter for adapter, _ in trained.values()], method="linear"))
    base, own, joint, change = [], [], [], []
    with torch.no_grad():
        for digit, (adapter, token) in trained.items():
            concept = concepts[digit]
            X = concept.X_test
            f_0 = backbone(X, backbone.prompt(concept.token))
            f_j = with_update(backbone, adapter)(X, backbone.prompt(token))
            f_m = merged(X, backbone.prompt(token))
            base.append(_accuracy(f_0, concept.y_test))
            own.append(_accuracy(f_j, concept.y_test))
            joint.append(_accuracy(f_m, concept.y_test))
            change.append(((f_m - f_j).norm() / (f_j - f_0).norm()).item())
    return {
        "base": statistics.mean(base),
        "individual": statistics.mean(own),
        "merged": statistics.mean(joint),
        "interference": statistics.mean(change),
    }


def run(
    seeds: Sequence[int],
    *,
    steps: int,
    lr: float,
    methods: Sequence[str],
    dim: int = DIM,
) -> dict[str, dict[str, list[float]]]:
    """Method → metric → list of values, one per seed."""
    results: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for seed in seeds:
        backbone, concepts = pretrain(seed, dim=dim)
        for method in methods:
            torch.manual_seed(seed)
            osrm = None
            if method.startswith("osrm"):
                prompts = {str(d): [(c.X_train, backbone.prompt(c.token))] for d, c in concepts.items()}
                osrm = OSRM(method.removeprefix("osrm-"), target_modules=list(TARGETS)).fit(backbone, prompts)
            allocator = BasisAllocator(seed=seed)
            trained = {
                digit: train_concept(
                    backbone, digit, concept, method, osrm=osrm, allocator=allocator, steps=steps, lr=lr
                )
                for digit, concept in concepts.items()
            }
            for metric, value in evaluate(backbone, trained, concepts).items():
                results[method].setdefault(metric, []).append(value)
    return results
