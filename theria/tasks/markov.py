"""Few-shot next-token prediction on random Markov chains: a causal-attention sequence task.

Each task is a first-order Markov chain over `vocab_size` tokens, its transition rows
softmax(`logit_scale` · z) with z standard normal (a large scale gives peaky, predictable rows).
The support set is `k_shot` sequences from the chain, the query set `k_query` more; a model
reads tokens[:-1] and predicts tokens[1:] (cross-entropy). The chain is identified by an
integer task id, its transition matrix a deterministic function of (seed, id); the splits own
disjoint id ranges, so meta-val/test chains are never meta-train chains.

A model that adapts well has to read the transition statistics of the support sequences into
its weights; within a query sequence, causal attention over the prefix also carries evidence of
the chain (in-context), which is why this task exercises the attention's second derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from theria.tasks.episode import Episode, Split, check_positive, check_split, split_generator


@dataclass
class MarkovChainTasks:
    """Sampler of Markov-chain episodes: support_x/y (K, L) int64 token ids (y = x shifted by
    one), query_x/y (Q, L), task_info () = the chain's id."""

    vocab_size: int = 8
    seq_len: int = 32
    k_shot: int = 4
    k_query: int = 4
    logit_scale: float = 2.0
    n_train_tasks: int = 1 << 20  # ids [0, n_train), then val and test ranges
    n_val_tasks: int = 1 << 12
    n_test_tasks: int = 1 << 12
    seed: int = 0
    loss = "ce"

    def __post_init__(self) -> None:
        check_positive(
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            k_shot=self.k_shot,
            k_query=self.k_query,
            logit_scale=self.logit_scale,
            n_train_tasks=self.n_train_tasks,
            n_val_tasks=self.n_val_tasks,
            n_test_tasks=self.n_test_tasks,
        )
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2; got {self.vocab_size}")
        starts = [0, self.n_train_tasks, self.n_train_tasks + self.n_val_tasks]
        sizes = [self.n_train_tasks, self.n_val_tasks, self.n_test_tasks]
        self._ranges = {
            s: (a, n) for s, a, n in zip(("train", "val", "test"), starts, sizes, strict=True)
        }

    def transition_matrix(self, task_id: int) -> torch.Tensor:
        """(V, V) row-stochastic matrix of chain `task_id`, a function of (seed, task_id):
        rows softmax(logit_scale · z), z ~ N(0, I). A larger scale gives peakier rows."""
        g = split_generator(self.seed, task_id)
        z = torch.randn(self.vocab_size, self.vocab_size, generator=g, dtype=torch.float64)
        return torch.softmax(self.logit_scale * z, dim=-1)  # (V, V)

    def task_ids(self, split: Split) -> tuple[int, int]:
        """(first id, number of ids) owned by `split`."""
        check_split(split)
        return self._ranges[split]

    def sample(self, split: Split, n_tasks: int, generator: torch.Generator) -> Episode:
        check_split(split)
        check_positive(n_tasks=n_tasks)
        first, count = self._ranges[split]
        ids = first + torch.randint(count, (n_tasks,), generator=generator)  # (T,)
        trans = torch.stack([self.transition_matrix(int(i)) for i in ids])  # (T, V, V)
        n_seq, length = self.k_shot + self.k_query, self.seq_len + 1
        tokens = torch.empty(n_tasks, n_seq, length, dtype=torch.long)
        tokens[:, :, 0] = torch.randint(self.vocab_size, (n_tasks, n_seq), generator=generator)
        rows = torch.arange(n_tasks)[:, None]  # (T, 1)
        for t in range(1, length):
            probs = trans[rows, tokens[:, :, t - 1]]  # (T, N, V): the rows of current tokens
            nxt = torch.multinomial(probs.reshape(-1, self.vocab_size), 1, generator=generator)
            tokens[:, :, t] = nxt.reshape(n_tasks, n_seq)
        x, y = tokens[:, :, :-1], tokens[:, :, 1:]  # (T, N, L) each
        k = self.k_shot
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], ids, "ce")
