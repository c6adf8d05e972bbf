"""Train on noisy digits from a LightningCLI YAML, with gradient capture configured in that YAML.

The model and the data are ordinary Lightning classes; :class:`~mstore_lightning.GradientCapture`
is one more ``trainer.callbacks`` entry of ``config.yaml``, with its capture policy and its
epoch-end analytics nested under ``init_args``. After ``fit`` the script reads the store back and
prints how well self-influence singles out the training samples whose label was flipped.

Run from the repository root::

    python example_projects/digits_cli/train.py fit --config example_projects/digits_cli/config.yaml
    python example_projects/digits_cli/train.py fit --config example_projects/digits_cli/config.yaml \\
        --trainer.max_epochs 5 --data.noise_fraction 0.2
    python example_projects/digits_cli/train.py fit --config example_projects/digits_cli/config.yaml \\
        --print_config
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import ArgsType, LightningCLI
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mstore_lightning import GradientCapture, IndexedDataset, open_store

NUM_CLASSES = 10
DEFAULT_TOP_K = 20


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's bundled 8x8 digits, with a fraction of the training labels flipped.

    Args:
        noise_fraction: fraction of training labels changed to a wrong class, in ``[0, 1)``.
        batch_size: samples per batch.
        num_workers: data loader worker processes.
        seed: seed of the train/validation split and of the label noise.
    """

    def __init__(
        self, noise_fraction: float = 0.1, batch_size: int = 64, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 <= noise_fraction < 1.0:
            raise ValueError(f"`noise_fraction` must be in [0, 1), got {noise_fraction!r}.")
        self.noise_fraction = noise_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.flipped = np.empty(0, dtype=np.int64)  # training-set positions whose label was flipped

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x_train, x_val, y_train, y_val = train_test_split(
            digits.data, digits.target, test_size=0.2, random_state=self.seed, stratify=digits.target
        )
        # Fit the scaler on the training split only, so no validation statistics leak into training.
        scaler = StandardScaler().fit(x_train)
        x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)

        rng = np.random.default_rng(self.seed)
        n_flip = round(self.noise_fraction * len(y_train))
        self.flipped = np.sort(rng.choice(len(y_train), size=n_flip, replace=False))
        y_noisy = y_train.copy()
        # A shift of 1..9 classes always lands on a wrong class, each wrong class equally likely.
        y_noisy[self.flipped] = (y_train[self.flipped] + rng.integers(1, NUM_CLASSES, n_flip)) % NUM_CLASSES
        # Items become {"x", "y", "index"}: the "index" entry is what lets the capture callback name
        # every gradient row after its sample, whatever order a shuffling, multi-worker loader uses.
        self.train_set = IndexedDataset(_tensors(x_train, y_noisy))
        self.val_set = IndexedDataset(_tensors(x_val, y_val))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # Persistent workers are kept between epochs instead of being started again for each.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class DigitsMLP(L.LightningModule):
    """A 64-hidden-hidden-10 ReLU network trained with mean cross-entropy.

    Args:
        hidden: sizes of the two hidden layers.
        lr: Adam learning rate.
    """

    def __init__(self, hidden: tuple[int, int] = (128, 64), lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # batch["index"] is left alone: it is read by the capture callback, not by the model.
        loss = F.cross_entropy(self(batch["x"]), batch["y"], reduction="mean")
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["x"])
        self.log("val_loss", F.cross_entropy(logits, batch["y"]))
        self.log("val_acc", (logits.argmax(dim=1) == batch["y"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def find_capture(trainer: L.Trainer) -> GradientCapture:
    """The trainer's :class:`GradientCapture` callback.

    Raises:
        SystemExit: if the configuration has none.
    """
    captures = [cb for cb in trainer.callbacks if isinstance(cb, GradientCapture)]
    if not captures:
        raise SystemExit("error: the config has no mstore_lightning.GradientCapture in trainer.callbacks")
    return captures[0]


def summarize(trainer: L.Trainer, datamodule: DigitsDataModule) -> float:
    """Reads the store back and prints how well self-influence finds the flipped labels.

    Args:
        trainer: the trainer after ``fit``.
        datamodule: the data it was fitted on, which knows which labels were flipped.

    Returns:
        Precision at k: the fraction of the k most self-influential samples whose label was flipped.

    Raises:
        SystemExit: if the store has no committed epoch, or an epoch does not hold one row per
            training sample.
    """
    capture = find_capture(trainer)
    store = open_store(capture.store)
    n_train = len(datamodule.train_set)
    print(f"\nstore: {os.path.abspath(capture.store)}")
    print(f"policy: layers={list(capture.policy.layers)} precision={capture.policy.precision}")
    print(f"analytics: {', '.join(s.name for s in capture.analytics) or 'none'}")
    if not store.epochs:
        raise SystemExit("error: the store has no committed epochs")
    for epoch in store.epochs:
        ids = np.sort(np.asarray(store.sample_ids(epoch)))
        # Every sample is seen once per epoch, so a correct store holds a permutation of the ids.
        if not np.array_equal(ids, np.arange(n_train)):
            raise SystemExit(f"error: epoch {epoch} does not hold one row per training sample")
    print(f"epochs {store.epochs}: {n_train} training samples each, layers {store.layers}")

    # The same k the YAML gives the self_influence analytic, so the two report the same list.
    k = next((s.params["k"] for s in capture.analytics if s.name == "self_influence"), DEFAULT_TOP_K)
    ids, scores = store.self_influence()
    top = np.asarray(ids)[np.argsort(np.asarray(scores))[::-1][:k]]
    hits = int(np.isin(top, datamodule.flipped).sum())
    chance = k * len(datamodule.flipped) / n_train
    print(
        f"{len(datamodule.flipped)} flipped labels; among the {k} most self-influential samples: "
        f"{hits} (precision@{k} = {hits / k:.2f}, chance {chance:.1f})"
    )
    return hits / k


def cli_main(args: ArgsType = None) -> LightningCLI:
    """Runs the CLI's subcommand and, after ``fit``, prints the summary.

    Args:
        args: arguments instead of ``sys.argv[1:]``, e.g. ``["fit", "--config", "config.yaml"]``.

    Returns:
        The CLI, with its ``trainer``, ``model`` and ``datamodule``.
    """
    cli = LightningCLI(DigitsMLP, DigitsDataModule, args=args)
    if cli.subcommand == "fit":
        summarize(cli.trainer, cli.datamodule)
    return cli


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


if __name__ == "__main__":
    cli_main()
