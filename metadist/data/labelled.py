"""Every image of a split's classes as one labelled set, for supervised training.

Example ``i`` is image ``positions[i]`` of class ``labels[i]``: the classes in the
store's order (rotated copies are classes of their own, as in episodes), the images in
their order within a class. An image's label is its class's index in the split. Images
come from the ``ClassStore`` as uint8, decoded and resized as every episode's are, and
are preprocessed by the caller with the run's ``Preprocessing``, so a classifier trained
on them sees what meta-training and the Learner feed the same backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metadist.data.store import ClassStore


class LabelledImages:
    def __init__(self, store: ClassStore) -> None:
        self.store = store
        sizes = [store.class_size(c) for c in range(store.num_classes)]
        self.labels = np.repeat(np.arange(store.num_classes, dtype=np.int64), sizes)
        self.positions = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def decode_all(self) -> None:
        """Decode every class now (the store keeps them): a bad image fails before the
        first step, and the steps read from memory."""
        for base in range(self.store.num_base_classes):
            self.store.load_examples(base, [0])

    def load(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``indices``: uint8 images [n, C, S, S] and int64 labels [n]."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            s = self.store.image_size
            return (torch.zeros(0, self.store.channels, s, s, dtype=torch.uint8),
                    torch.zeros(0, dtype=torch.int64))
        images = torch.cat([self.store.load_examples(int(c), [int(p)]) for c, p in
                            zip(self.labels[indices], self.positions[indices], strict=True)])
        return images, torch.from_numpy(self.labels[indices].copy())
