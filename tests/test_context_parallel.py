"""The context-parallel token layout: the same as megatron's `get_batch_on_this_cp_rank`."""

import pytest
import torch

from sara_megatron.models.context_parallel import context_parallel_positions, context_parallel_slice


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_slice_matches_megatron_layout(single_rank, cp_size, monkeypatch):
    from sara_megatron.compat.megatron_versions import get_batch_on_this_cp_rank

    # megatron-core 0.18+ asks torch.distributed for the group's size and rank instead of the
    # group itself; answer for the stand-in groups, pass everything else through.
    for name, of_fake in (("get_world_size", _FakeGroup.size), ("get_rank", _FakeGroup.rank)):
        real = getattr(torch.distributed, name)
        monkeypatch.setattr(torch.distributed, name, lambda group=None, _real=real, _of=of_fake:
                            _of(group) if isinstance(group, _FakeGroup) else _real(group))

    tokens = torch.arange(3 * 32).view(3, 32)
    mask = torch.rand(3, 32) > 0.5
    seen = []
    for cp_rank in range(cp_size):
        group = _FakeGroup(cp_rank, cp_size)
        expected = get_batch_on_this_cp_rank({"tokens": tokens, "mask": mask}, cp_group=group)
        assert torch.equal(context_parallel_slice(tokens, cp_rank, cp_size), expected["tokens"])
        assert torch.equal(context_parallel_slice(mask, cp_rank, cp_size), expected["mask"])
        positions = context_parallel_positions(32, cp_rank, cp_size)
        assert torch.equal(tokens[0, positions], expected["tokens"][0])
        seen.append(positions)
    # Every position is held by exactly one rank.
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(32))


def test_indivisible_sequence_is_refused():
    with pytest.raises(ValueError, match="2 × context parallel size 2"):
        context_parallel_positions(30, 0, 2)


class _FakeGroup:
    """What `get_batch_on_this_cp_rank` asks of a process group: its size and this rank."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank
