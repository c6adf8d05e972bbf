"""Find mislabelled sentences from the per-sample gradients of a small transformer's training run.

A tiny BERT-style classifier (Hugging Face ``BertForSequenceClassification`` built from a config, random
init, nothing downloaded) is trained on a *generated* topic-classification task: each sentence mixes
common words with words of its topic (sports, weather, food, music) and a few words of other topics.
Before training, 10% of the training labels are flipped to a wrong topic.
:class:`~mstore_lightning.GradientCapture` records every training sample's gradient in every epoch; the
script then reads the store back and scores each sample by its self-influence
``Σ_e lr_e ‖g_i(e)‖²``: a sentence whose label contradicts its words is never fitted, so its gradient
stays large, while the clean sentences are learned.

Run from the repository root::

    python example_projects/text_classifier/train.py [--store runs/text.zarr] [--epochs 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config; nothing is fetched

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.reports import report_paths

SEED = 0
NOISE_FRACTION = 0.10
TRAIN_SIZE, TEST_SIZE = 1000, 400
MAX_LEN = 21  # tokens, [CLS] included; shorter sentences are padded
BATCH_SIZE = 50
TOP_K = 20

# The generated language: common words, and the words of each topic.
COMMON = (  # noqa: SIM905 - a sentence of words reads better than a column of them
    "the a an of and to in on with for at by from this that it was is were be has had they we "
    "you i he she there here very quite some many more most every all one two then after before today"
).split()
TOPICS = {
    "sports": "team goal match player coach score league season win referee stadium ball race runner "
    "champion tennis football final trophy",
    "weather": "rain snow storm wind cloud sunny forecast cold warm humid thunder fog frost breeze "
    "temperature sky drizzle heatwave",
    "food": "bread cheese soup recipe kitchen spicy oven salad dinner lunch pasta garlic sauce bake "
    "dessert flavor chef taste",
    "music": "song guitar concert album band melody piano drum singer lyrics chorus orchestra rhythm "
    "tune stage violin jazz record",
}
CLASSES = list(TOPICS)
PAD, CLS = "[PAD]", "[CLS]"
VOCAB = [PAD, CLS, *COMMON, *(w for words in TOPICS.values() for w in words.split())]
TOKEN = {w: i for i, w in enumerate(VOCAB)}

# The last layer's gradient, ``(p - onehot(y)) ⊗ h``, is where a contradicted label shows most plainly;
# the encoder's gradients also grow with unusual inputs (repeated words, stray topic words).
HEAD = ["bert.classifier"]
# Reported after each epoch to the HTML report beside the store.
ANALYTICS = ["norms", {"self_influence": {"k": 16}}, "class_conflicts", "storage"]


def generate(n: int, rng: np.random.Generator) -> tuple[list[list[str]], np.ndarray]:
    """``n`` generated sentences and their topics.

    A sentence has 8 to 20 words in random order: 3 to 5 from its own topic, up to 2 from other
    topics (so no single word decides it), the rest common words.
    """
    sentences, labels = [], rng.integers(0, len(CLASSES), size=n)
    topic_words = [TOPICS[c].split() for c in CLASSES]
    for label in labels:
        length, own, stray = rng.integers(8, 21), rng.integers(3, 6), rng.integers(0, 3)
        words = list(rng.choice(topic_words[label], size=own))
        for _ in range(stray):
            other = (label + rng.integers(1, len(CLASSES))) % len(CLASSES)
            words.append(rng.choice(topic_words[other]))
        words += list(rng.choice(COMMON, size=length - len(words)))
        sentences.append([str(w) for w in rng.permutation(words)])
    return sentences, labels


def encode(sentences: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, MAX_LEN)`` with ``[CLS]`` first and padding last, and the attention mask."""
    ids = torch.full((len(sentences), MAX_LEN), TOKEN[PAD], dtype=torch.long)
    for row, words in enumerate(sentences):
        tokens = [TOKEN[CLS], *(TOKEN[w] for w in words)][:MAX_LEN]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, (ids != TOKEN[PAD]).long()


class Sentences(Dataset):
    """Encoded sentences as dicts that carry their dataset index (how capture names each row)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: np.ndarray) -> None:
        self.ids, self.mask = ids, mask
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "label": self.labels[i], "index": i}


class TopicClassifier(L.LightningModule):
    """A 2-layer BERT encoder (hidden 64, 4 heads), pooled at ``[CLS]``, a linear head, mean cross-entropy.

    Args:
        lr: AdamW learning rate.
    """

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        config = transformers.BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=MAX_LEN,
            num_labels=len(CLASSES),
            pad_token_id=TOKEN[PAD],
        )
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # batch["index"] is left alone: the capture callback reads it, the model does not.
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def flip_labels(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Moves ``NOISE_FRACTION`` of ``labels`` to a wrong class.

    Returns:
        The noisy labels, and the positions whose label was changed.
    """
    flipped = np.sort(rng.choice(len(labels), size=round(NOISE_FRACTION * len(labels)), replace=False))
    noisy = labels.copy()
    # A shift of 1..C-1 classes always lands on a wrong class, each wrong class equally likely.
    noisy[flipped] = (labels[flipped] + rng.integers(1, len(CLASSES), size=len(flipped))) % len(CLASSES)
    return noisy, flipped


@torch.no_grad()
def accuracy(model: TopicClassifier, ids: torch.Tensor, mask: torch.Tensor, labels: np.ndarray) -> float:
    """Fraction of the sentences that ``model`` assigns to ``labels``."""
    model.eval()
    return float((model(ids, mask).argmax(1).numpy() == labels).mean())


def by_sample(ids: np.ndarray, values: np.ndarray, n: int, what: str) -> np.ndarray:
    """``values`` (aligned with ``ids``) indexed by sample id; exits if a sample is missing or not finite."""
    if len(ids) != n or not np.array_equal(np.sort(ids), np.arange(n)):
        raise SystemExit(f"error: the store's {what} do not cover each training sample once")
    if not np.all(np.isfinite(values)):
        raise SystemExit(f"error: the store's {what} hold non-finite values")
    out = np.empty(n)
    out[ids] = values
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/text.zarr", help="where to write the gradient store")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (all are captured)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def main() -> None:
    """Trains with gradient capture, then scores each sample by self-influence and gradient norm."""
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's use of a deprecated torch API
    transformers.logging.set_verbosity_error()
    L.seed_everything(SEED, workers=True, verbose=False)
    rng = np.random.default_rng(SEED)

    sentences, clean = generate(TRAIN_SIZE + TEST_SIZE, rng)
    ids, mask = encode(sentences)
    noisy, flipped = flip_labels(clean[:TRAIN_SIZE], rng)
    train = Sentences(ids[:TRAIN_SIZE], mask[:TRAIN_SIZE], noisy)
    loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True)

    model = TopicClassifier()
    capture = GradientCapture(
        store=args.store,
        policy={"layers": ["*"], "precision": "int8", "loss_reduction": "mean"},
        mode="overwrite",
        analytics=ANALYTICS,
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[capture],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        # The position table is looked up once for the whole batch; the store records it as uncovered.
        warnings.filterwarnings("ignore", ".*position_embeddings.*")
        trainer.fit(model, loader)

    store = open_store(args.store)
    print(f"store: {os.path.abspath(args.store)}")
    print(store.describe())
    print()
    if not store.epochs:
        raise SystemExit("error: the store has no committed epochs")

    is_flipped = np.zeros(TRAIN_SIZE, dtype=bool)
    is_flipped[flipped] = True
    chance = TOP_K * len(flipped) / TRAIN_SIZE
    print(
        f"{TRAIN_SIZE} training sentences, {len(flipped)} with a flipped label; flipped among the "
        f"{TOP_K} highest scores (chance: {chance:.1f}), and ROC-AUC of the score as a detector:"
    )
    print(f"  {'score':<32} {'top ' + str(TOP_K):>6} {'ROC-AUC':>8}")

    def report(name: str, score: np.ndarray) -> None:
        top = np.argsort(score)[::-1][:TOP_K]
        print(f"  {name:<32} {int(is_flipped[top].sum()):>6} {roc_auc_score(is_flipped, score):>8.3f}")

    for epoch in store.epochs:
        norms = by_sample(store.sample_ids(epoch), np.asarray(store.norms(epoch)), TRAIN_SIZE, "norms")
        report(f"gradient norm, epoch {epoch}", norms)
    scores = {}
    for name, layers in (("all layers", None), ("classifier head", HEAD)):
        si_ids, si_scores = store.self_influence(layers=layers)
        scores[name] = by_sample(np.asarray(si_ids), np.asarray(si_scores), TRAIN_SIZE, "self-influence")
        report(f"self-influence, {name}", scores[name])
    influence = scores["classifier head"]

    print("\nthe 5 sentences with the highest self-influence at the classifier head (given -> true topic):")
    for i in np.argsort(influence)[::-1][:5]:
        mark = "flipped" if is_flipped[i] else "clean"
        print(
            f"  #{i:<4} {CLASSES[noisy[i]]:>7} -> {CLASSES[clean[i]]:<7} ({mark}): {' '.join(sentences[i])}"
        )
    test = slice(TRAIN_SIZE, None)
    print(f"\ntest accuracy: {accuracy(model, ids[test], mask[test], clean[test]):.3f}")
    print(f"self-influence ROC-AUC (classifier head): {roc_auc_score(is_flipped, influence):.3f}")
    print(f"report: {report_paths(args.store).html}  (open it in a browser)")


if __name__ == "__main__":
    main()
