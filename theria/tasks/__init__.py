"""Task samplers: support/query episodes for few-shot learning.

API summary (all samplers share it):

    sampler.sample(split, n_tasks, generator) -> Episode   # split in {"train", "val", "test"}
    sampler.loss                                            # "mse" or "ce"
    Episode(support_x, support_y, query_x, query_y, task_info, loss)
        batched: every tensor has a leading task dim T; episode.task(i), episode.n_tasks,
        episode.to(device, dtype), Episode.stack([...]), episode.tensors()
    task_loss(kind, pred, target) -> (mean loss, accuracy or None)

Samplers (deterministic given the generator's state; splits draw from disjoint task families):

    SinusoidTasks(k_shot=10, k_query=10, ...)          x, y: (T, K, 1)          loss "mse"
    MarkovChainTasks(vocab_size=8, seq_len=32, ...)    x, y: (T, K, L) tokens   loss "ce"
        (few-shot next-token prediction; a causal-attention task)
    GlyphTasks(n_way=5, k_shot=1, k_query=15, ...)     x: (T, N·K, 1, 28, 28), y: (T, N·K)
        (procedural alphabet, no download)                                      loss "ce"
    OmniglotTasks(root, n_way, k_shot, k_query, image_size=28, background="full", split=
                  "character", rotations=False, ...)      same shapes as GlyphTasks
        (the official zips read in place, or torchvision's folders; background = full |
        small1 | small2 | small1+small2; theria.tasks.omniglot.load_set caches per process)
    FewShotClassification(pool, n_way, k_shot, k_query, rotations, max_shift)   any ClassPool
"""

from theria.tasks.classification import ClassPool, FewShotClassification
from theria.tasks.episode import SPLITS, Episode, LossKind, Split, TaskSampler, task_loss
from theria.tasks.glyphs import GlyphAlphabet, GlyphTasks
from theria.tasks.markov import MarkovChainTasks
from theria.tasks.omniglot import OmniglotClasses, OmniglotTasks
from theria.tasks.sinusoid import SinusoidTasks

__all__ = [
    "SPLITS",
    "ClassPool",
    "Episode",
    "FewShotClassification",
    "GlyphAlphabet",
    "GlyphTasks",
    "LossKind",
    "MarkovChainTasks",
    "OmniglotClasses",
    "OmniglotTasks",
    "SinusoidTasks",
    "Split",
    "TaskSampler",
    "task_loss",
]
