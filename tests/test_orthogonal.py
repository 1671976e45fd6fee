"""Orthogonal adaptation: shared seeded bases, disjoint blocks, frozen lora_A, recorded allocations, exact sums."""

import warnings

import pytest
import torch
from torch import nn

from adaptermerge import Adapter, AdapterMergeWarning, LowRank, load_adapter, merge_adapters
from adaptermerge.training import (
    BasisAllocator,
    allocation_metadata,
    apply_orthogonal_basis,
    check_disjoint,
    orthogonal_basis,
    read_allocation,
    write_allocation,
)


def _peft_model(r=4):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    return get_peft_model(base, LoraConfig(r=r, target_modules=["0", "2"]))


def test_basis_is_bit_reproducible_and_blocks_are_orthogonal():
    a = orthogonal_basis("down.to_q", 32, range(0, 4), seed=7, dtype=torch.float64)
    b = orthogonal_basis("down.to_q", 32, range(4, 12), seed=7, dtype=torch.float64)
    assert torch.equal(a, orthogonal_basis("down.to_q", 32, range(0, 4), seed=7, dtype=torch.float64))
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (a @ b.T).abs().max() < 1e-12
    torch.testing.assert_close(orthogonal_basis("down.to_q", 32, range(0, 12), seed=7, dtype=torch.float64)[:4], a)
    assert not torch.allclose(a, orthogonal_basis("down.to_k", 32, range(0, 4), seed=7, dtype=torch.float64))


def test_allocator_hands_out_disjoint_blocks_and_round_trips(tmp_path):
    allocator = BasisAllocator(seed=3)
    dog, cat = allocator.allocate("dog", 4), allocator.allocate("cat", 2)
    assert (dog.start, dog.stop, cat.start, cat.stop) == (0, 4, 4, 6)
    assert allocator.allocate("dog", 4) == dog
    loaded = BasisAllocator.load(allocator.save(tmp_path / "alloc.json"))
    assert loaded.allocations_ == allocator.allocations_ and loaded.allocate("owl", 1).start == 6


def test_apply_freezes_lora_A_and_training_changes_only_lora_B():
    model = _peft_model()
    allocation = BasisAllocator().allocate("dog", 4)
    assert sorted(apply_orthogonal_basis(model, allocation)) == ["0", "2"]
    layer = model.base_model.model[0]
    A_before = layer.lora_A["default"].weight.detach().clone()
    torch.testing.assert_close(A_before, orthogonal_basis("0", 32, allocation.rows))
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 32)).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(layer.lora_A["default"].weight, A_before)
    assert layer.lora_B["default"].weight.abs().sum() > 0


def _concept(allocation, seed):
    g = torch.Generator().manual_seed(seed)
    A = orthogonal_basis("0", 32, allocation.rows)
    return LowRank(A, torch.randn(16, allocation.rank, generator=g))


def test_sum_of_concepts_acts_on_each_block_as_that_concept_alone():
    allocator = BasisAllocator()
    dog, cat = (_concept(allocator.allocate(c, 4), i) for i, c in enumerate(("dog", "cat")))
    merged = merge_adapters([Adapter({"0": dog}, name="dog"), Adapter({"0": cat}, name="cat")])["0"]
    torch.testing.assert_close(merged.to_dense(), dog.to_dense() + cat.to_dense())
    x = dog.A.double().T @ torch.randn(4, 5, dtype=torch.float64)  # inputs in the dog's rows
    torch.testing.assert_close(merged.to_dense() @ x, dog.to_dense() @ x)


def test_allocation_is_recorded_in_the_saved_file_and_overlaps_warn(tmp_path):
    from safetensors.torch import save_file

    allocator = BasisAllocator(seed=1)
    blocks = [allocator.allocate("dog", 4), allocator.allocate("cat", 4)]
    paths = []
    for allocation in blocks:
        lowrank = _concept(allocation, 0)
        path = tmp_path / f"{allocation.concept}.safetensors"
        state = {"base_model.model.0.lora_A.weight": lowrank.A, "base_model.model.0.lora_B.weight": lowrank.B}
        save_file(state, str(path), metadata=allocation_metadata(allocation))
        paths.append(path)
    assert read_allocation(paths[0]) == blocks[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_disjoint(paths) == blocks
    clash = BasisAllocator(seed=1).allocate("owl", 2)  # a second allocator reuses rows 0:2
    write_allocation(paths[1], clash)
    assert read_allocation(paths[1]) == clash
    with pytest.warns(AdapterMergeWarning, match="share basis rows"):
        check_disjoint(paths)


def test_check_disjoint_reads_peft_folders_and_is_silent_without_records(tmp_path, adapter_factory):
    from adaptermerge import save_adapter

    plain = [adapter_factory({"0": (16, 32)}, seed=s, name=f"a{s}") for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_disjoint(plain) == [None, None]
    folder = save_adapter(plain[0], tmp_path / "dog")
    write_allocation(folder, BasisAllocator().allocate("dog", 4))
    loaded = load_adapter(folder)
    assert read_allocation(loaded).concept == "dog"
    with pytest.warns(AdapterMergeWarning, match="record no orthogonal-adaptation block"):
        check_disjoint([loaded, plain[1]])
