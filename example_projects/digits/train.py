"""Find mislabelled digits from the per-sample gradients of a training run.

A small MLP is trained on scikit-learn's bundled 8x8 digits after 10% of the training labels
have been flipped to a wrong class. :class:`~mstore_lightning.GradientCapture` records the
gradient of every training sample in every epoch; the script then reads the store back and
asks how well the per-sample gradient norm singles out the flipped labels: a sample the model
cannot fit keeps a large loss, and so a large gradient, while the clean samples are learned.

Run from the repository root::

    python example_projects/digits/train.py [--store runs/digits.zarr] [--epochs 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.reports import report_paths

SEED = 0
NOISE_FRACTION = 0.10
TOP_K = 20
BATCH_SIZE = 64
NUM_CLASSES = 10
# What runs after each epoch; the results go to TensorBoard and to an HTML report beside the store.
ANALYTICS = [
    "norms",
    {"self_influence": {"k": 16, "image_shape": [8, 8]}},
    {"tracin": {"k": 3}},
    "class_conflicts",
    "storage",
]
# The reports may take 5% of training time: epochs are reported as often as that allows, and the last
# one always, which on this short run costs about as much again.
MAX_OVERHEAD = 0.05
QUERIES = 100  # test digits whose TracIn proponents the reports list


class DigitsDataset(Dataset):
    """Digits as dicts, each carrying its own position in the dataset.

    The ``"index"`` entry is what lets the capture callback name every gradient row after the
    sample it came from, whatever order a shuffling, multi-worker loader delivers them in.

    Args:
        x: features, shape ``(n, 64)``.
        y: class labels, shape ``(n,)``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i, dtype=torch.long)}


class DigitsMLP(L.LightningModule):
    """A 64-128-64-10 ReLU network trained with mean cross-entropy.

    Args:
        lr: Adam learning rate.
    """

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # batch["index"] is left alone: it is read by the capture callback, not by the model.
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="mean")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def parse_args() -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/digits.zarr", help="where to write the gradient store")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (all are captured)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def load_noisy_digits(
    seed: int, scaling: str = "standard"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Splits and scales the digits, then flips a fixed fraction of the training labels.

    Args:
        seed: seed of the split and of the label noise.
        scaling: ``"standard"`` standardises each pixel with the training split's mean and
            deviation; ``"unit"`` divides the 0-16 intensities by 16, keeping every pixel in
            ``[0, 1]``. Standardising turns the rare ink of near-blank border pixels into
            values up to 42 deviations from their mean.

    Returns:
        ``(x_train, y_train_noisy, x_test, y_test, flipped)``, where ``flipped`` holds the
        training-set positions whose label was changed.

    Raises:
        ValueError: if ``scaling`` is neither ``"standard"`` nor ``"unit"``.
    """
    if scaling not in ("standard", "unit"):
        raise ValueError(f"scaling must be 'standard' or 'unit', got {scaling!r}")
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    if scaling == "unit":
        x_train, x_test = x_train / 16.0, x_test / 16.0
    else:
        # Fit the scaler on the training split only, so no test statistics leak into training.
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(y_train), size=round(NOISE_FRACTION * len(y_train)), replace=False))
    y_noisy = y_train.copy()
    # A shift of 1..9 classes always lands on a wrong class, each wrong class equally likely.
    y_noisy[flipped] = (y_train[flipped] + rng.integers(1, NUM_CLASSES, size=len(flipped))) % NUM_CLASSES
    return x_train, y_noisy, x_test, y_test, flipped


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    pred = model(torch.as_tensor(x, dtype=torch.float32)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def norms_by_sample(store, epoch: int, n_samples: int) -> np.ndarray:
    """The per-sample gradient norms of one epoch, indexed by sample id.

    Args:
        store: an opened gradient store.
        epoch: a committed epoch.
        n_samples: size of the training set.

    Returns:
        Array of shape ``(n_samples,)``.

    Raises:
        SystemExit: if the epoch does not hold exactly one finite row per training sample.
    """
    ids = np.asarray(store.sample_ids(epoch))
    norms = np.asarray(store.norms(epoch), dtype=np.float64)
    # Every sample is seen once per epoch, so a correct store holds a permutation of the ids.
    if len(ids) != n_samples or not np.array_equal(np.sort(ids), np.arange(n_samples)):
        raise SystemExit(f"error: epoch {epoch} does not hold one row per training sample")
    if norms.shape != ids.shape or not np.all(np.isfinite(norms)):
        raise SystemExit(f"error: epoch {epoch} has missing or non-finite gradient norms")
    out = np.empty(n_samples)
    out[ids] = norms
    return out


def check_queries(store, epoch: int, ids: np.ndarray, norms: np.ndarray) -> float:
    """Cross-checks ``dot`` and ``restore`` against ``norms`` for a few samples.

    The squared norm of a gradient is its inner product with itself, and also the sum of
    squares of its restored per-parameter tensors; the three queries must agree.

    Args:
        store: an opened gradient store.
        epoch: a committed epoch.
        ids: sample ids to check.
        norms: their gradient norms from ``store.norms``.

    Returns:
        The largest relative disagreement among the three.
    """
    expected = norms**2
    from_dot = np.diag(np.asarray(store.dot(epoch, ids, ids), dtype=np.float64))
    from_restore = np.zeros(len(ids))
    for layer in store.layers:
        for grad in store.restore(epoch, layer, ids).values():
            from_restore += grad.double().reshape(len(ids), -1).pow(2).sum(dim=1).numpy()
    return float(max(np.max(np.abs(v - expected) / expected) for v in (from_dot, from_restore)))


def main() -> None:
    """Trains with gradient capture, then scores each sample by its gradient norm."""
    args = parse_args()
    # Keep the demo's output to its results: no progress bars or per-run banners.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning's own use of a torch API that newer torch deprecates; nothing this script can act on.
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    L.seed_everything(SEED, workers=True, verbose=False)

    x_train, y_train, x_test, y_test, flipped = load_noisy_digits(SEED)
    n_train = len(y_train)
    # persistent_workers keeps the two workers alive between epochs instead of re-forking them.
    loader = DataLoader(
        DigitsDataset(x_train, y_train),
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
    )

    model = DigitsMLP()
    capture = GradientCapture(
        store=args.store,
        policy={"layers": ["*"], "precision": "fp32", "loss_reduction": "mean"},
        mode="overwrite",
        # Test digits are the queries: TracIn names the training samples behind each prediction.
        query=DataLoader(DigitsDataset(x_test[:QUERIES], y_test[:QUERIES]), batch_size=QUERIES),
        analytics=ANALYTICS,
        analytics_max_overhead=MAX_OVERHEAD,
    )
    logger = TensorBoardLogger(save_dir=os.path.dirname(args.store) or ".", name="tensorboard")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[capture],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)

    store = open_store(args.store)
    print(f"store: {os.path.abspath(args.store)}")
    print(store.describe())
    print()
    if not store.epochs:
        raise SystemExit("error: the store has no committed epochs")

    is_flipped = np.zeros(n_train, dtype=bool)
    is_flipped[flipped] = True
    chance = TOP_K * len(flipped) / n_train
    print(
        f"{n_train} training samples, {len(flipped)} with a flipped label; "
        f"flipped among the {TOP_K} largest gradient norms (chance: {chance:.1f}):"
    )
    print(f"  {'epoch':>5}  {'top ' + str(TOP_K):>6}  {'ROC-AUC':>7}")

    def report(label: str, score: np.ndarray) -> None:
        top = np.argsort(score)[::-1][:TOP_K]
        auc = roc_auc_score(is_flipped, score)
        print(f"  {label:>5}  {int(is_flipped[top].sum()):>6}  {auc:>7.3f}")

    total = np.zeros(n_train)
    for epoch in store.epochs:
        score = norms_by_sample(store, epoch, n_train)
        report(str(epoch), score)
        total += score
    report("sum", total)

    last = store.epochs[-1]
    top = np.argsort(total)[::-1][:TOP_K]
    err = check_queries(store, last, top, norms_by_sample(store, last, n_train)[top])
    if not err < 1e-3:
        raise SystemExit(f"error: dot/restore disagree with norms (relative error {err:.2e})")
    print(f"dot() and restore() agree with norms() on the top {TOP_K} (max relative error {err:.1e})")
    print(f"test accuracy: {accuracy(model, x_test, y_test):.3f}")
    print(f"report: {report_paths(args.store).html}  (open it in a browser)")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {logger.save_dir})")


if __name__ == "__main__":
    main()
