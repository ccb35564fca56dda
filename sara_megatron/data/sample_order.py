"""Which samples each data-parallel rank trains on, step by step: deterministic and resumable.

One global stream of sample indices, independent of the data-parallel size: epoch e is a
permutation of the dataset drawn from (seed, e), and epochs follow each other. Each step consumes
`micro_batch_size × dp_size` consecutive stream positions; rank r takes its `micro_batch_size`
slice. Resuming from `consumed_samples` (a multiple of that step) continues the same stream, and a
run resumed with another DP size (same global batch) sees the same global batches.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class GlobalSampleOrder:
    """The order samples are taken in over epochs: `order[position]` is the dataset index at a
    global position (epoch = position // num_samples), each epoch its own permutation.

    Args:
        num_samples: Samples in the dataset (>= 1).
        seed: The permutations' seed (with the epoch).
        shuffle: False keeps dataset order.

    Raises:
        ValueError: An empty dataset.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._epoch, self._permutation = -1, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """One epoch's order.

        Args:
            epoch: The epoch, from 0.

        Returns:
            [num_samples] dataset indices.
        """
        if epoch != self._epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._permutation = rng.permutation(self.num_samples)
            else:
                self._permutation = np.arange(self.num_samples)
            self._epoch = epoch
        return self._permutation

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        return int(self.epoch_order(epoch)[offset])


def check_dp_rank(dp_rank: int, dp_size: int) -> None:
    """Refuse a data-parallel rank outside 0..dp_size-1.

    Args:
        dp_rank: The rank.
        dp_size: The number of ranks.

    Raises:
        ValueError: Outside.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")


def check_rank_position(micro_batch_size: int, dp_rank: int, dp_size: int,
                        consumed_samples: int) -> int:
    """Refuse a data-parallel rank outside its group, or a resume point that is not a whole number
    of steps.

    Args:
        micro_batch_size: Samples a micro-batch.
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the run already taken.

    Returns:
        The samples one step consumes over data parallel (micro_batch_size x dp_size).

    Raises:
        ValueError: A bad rank, or consumed_samples not a multiple of that.
    """
    check_dp_rank(dp_rank, dp_size)
    step = micro_batch_size * dp_size
    if consumed_samples % step:
        raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro batch × "
                         f"data parallel (micro_batch_size × dp_size) = {step}")
    return step


class RankMicroBatchSampler:
    """Batch sampler (for torch's DataLoader) of one data-parallel rank's micro-batches: each
    step takes the next micro_batch_size x dp_size positions of the global order, this rank
    its slice; a last incomplete step is dropped.

    Args:
        order: The global sample order.
        total_samples: Samples of the whole run (epochs x dataset).
        micro_batch_size: Samples a micro-batch.
        dp_rank, dp_size: This data-parallel rank and the number of ranks.
        consumed_samples: Samples of the run already taken (a resume starts after them).

    Raises:
        ValueError: As `check_rank_position`.
    """

    def __init__(self, order: GlobalSampleOrder, total_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0):
        check_rank_position(micro_batch_size, dp_rank, dp_size, consumed_samples)
        self.order = order
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def __len__(self) -> int:
        step = self.micro_batch_size * self.dp_size
        return max(0, (self.total_samples - self.consumed_samples) // step)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        position = self.consumed_samples
        while position + step <= self.total_samples:  # a last incomplete step is dropped
            start = position + self.dp_rank * self.micro_batch_size
            yield [self.order[p] for p in range(start, start + self.micro_batch_size)]
            position += step
