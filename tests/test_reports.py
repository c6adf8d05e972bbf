"""Epoch-end analytics (GradientCapture(analytics=...)) reported to real loggers and files."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from test_capture_fit import data
from test_query import QueryReference

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.analytics.ranking import best
from mstore_lightning.reports import report_paths
from mstore_lightning.reports.spec import AnalyticsError, parse_analytics

ANALYTICS = [
    "norms",
    {"self_influence": {"k": 5, "image_shape": [4, 4]}},
    {"tracin": {"k": 3}},
    "class_conflicts",
    "outliers",
    {"cluster": {"k": 3}},
    "storage",
    {"topk": {"k": 3}},
    {"similarity": {"ids": [2, 7, 11]}},
    "class_gradients",
    {"restore": {"ids": [4, 19]}},
]
EPOCHS = 2


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("reports")
    torch.manual_seed(0)
    x, y = data(n=40, d=16)
    qx, qy = data(n=6, d=16, seed=3)
    ref, qref = Reference(), QueryReference(qx, qy)
    with mock.patch.dict("os.environ", {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        loggers = [
            TensorBoardLogger(path / "tb", name="run"),
            CSVLogger(path / "csv", name="run"),
            MLFlowLogger("reports", tracking_uri=f"file:{path / 'mlruns'}"),
        ]
        metrics_calls = mock.Mock(wraps=loggers[1].log_metrics)
        loggers[1].log_metrics = metrics_calls
        cap = GradientCapture(
            path / "s.zarr",
            policy=EXACT,
            query=loader(qx, qy, batch_size=3, shuffle=False),
            analytics=ANALYTICS,
            analytics_background=True,  # the worker-process path, replayed to these loggers
        )
        steps = []
        tr = trainer([ref, cap, qref], max_epochs=EPOCHS, logger=loggers)
        tr.fit(Task(net()), loader(x, y))
    steps = [(e + 1) * 5 for e in range(EPOCHS)]  # 40 samples, batches of 8: 5 steps an epoch
    return {
        "path": path,
        "store": open_store(path / "s.zarr"),
        "ref": ref,
        "loggers": loggers,
        "calls": metrics_calls,
        "steps": steps,
        "mlflow_run": loggers[2].run_id,
    }


def reference_self_influence(run, upto: int) -> dict[int, float]:
    store, ref = run["store"], run["ref"]
    out: dict[int, float] = {}
    for e in range(upto + 1):
        for sid, grads in ref.grads[e].items():
            sq = sum(float((g.double() ** 2).sum()) for g in grads.values())
            out[sid] = out.get(sid, 0.0) + store.lr(e) * sq
    return out


def test_every_analytic_ran_each_epoch_and_left_its_files(run):
    paths = report_paths(run["path"] / "s.zarr")
    assert paths.epochs() == list(range(EPOCHS))
    assert paths.html.is_file()
    for e in range(EPOCHS):
        summary = paths.read_summary(e)
        assert summary["global_step"] == run["steps"][e]
        status = {r["name"]: r["status"] for r in summary["analytics"]}
        assert status == {name if isinstance(name, str) else next(iter(name)): "ok" for name in ANALYTICS}
        for record in summary["analytics"]:
            for item in record["figures"] + record["tables"]:
                assert (paths.epoch_dir(e) / item["file"]).stat().st_size > 0


def test_self_influence_table_matches_torch_func(run):
    paths = report_paths(run["path"] / "s.zarr")
    for e in range(EPOCHS):
        table = pd.read_csv(paths.epoch_dir(e) / "self_influence_topk.csv")
        expected = reference_self_influence(run, e)
        best = sorted(expected, key=expected.get, reverse=True)[:5]
        assert table["id"].tolist() == best
        np.testing.assert_allclose(table["score"], [expected[i] for i in best], rtol=1e-4)
        labels = dict(zip(run["store"].sample_ids(e), run["store"].row_field(e, "label")))
        assert table["label"].tolist() == [labels[i] for i in best]
        # The running sum equals the store's own self-influence over the same epochs.
        api = run["store"].self_influence(epochs=list(range(e + 1)))
        np.testing.assert_allclose(
            table["score"], api.scores[np.searchsorted(api.ids, table["id"])], rtol=1e-9
        )


def test_self_influence_table_is_the_store_api_ranked_by_best(run):
    paths, store = report_paths(run["path"] / "s.zarr"), run["store"]
    for e in range(EPOCHS):
        table = pd.read_csv(paths.epoch_dir(e) / "self_influence_topk.csv")
        api = store.self_influence(epochs=list(range(e + 1)))
        top = best(api.scores, 5)
        assert table["rank"].tolist() == list(range(1, len(top) + 1))
        assert table["id"].tolist() == api.ids[top].tolist()
        np.testing.assert_allclose(table["score"], api.scores[top], rtol=1e-9)


def test_tracin_table_matches_the_store_api(run):
    store = run["store"]
    table = pd.read_csv(report_paths(run["path"] / "s.zarr").epoch_dir(EPOCHS - 1) / "tracin_proponents.csv")
    queries = store.sample_ids(EPOCHS - 1, "query")
    api = store.tracin(queries)
    for q, rows in table.groupby("query", sort=False):
        scores = api.scores[list(queries).index(q)]
        best = np.argsort(-scores, kind="stable")[:3]
        assert rows["id"].tolist() == api.ids[best].tolist()
        # float32 sums, ordered by the report process's one thread: equal to float32 rounding
        np.testing.assert_allclose(rows["score"], scores[best], rtol=1e-6)


def test_topk_table_matches_the_store_api(run):
    store = run["store"]
    for e in range(EPOCHS):
        table = pd.read_csv(report_paths(run["path"] / "s.zarr").epoch_dir(e) / "topk_neighbours.csv")
        queries = store.sample_ids(e, "query")
        api = store.topk(queries, 3, epoch=e)  # the query rows, by cosine, as the report asked
        assert table["query"].tolist() == np.repeat(queries, 3).tolist()
        assert table["id"].tolist() == api.ids.reshape(-1).tolist()
        np.testing.assert_allclose(table["score"], api.scores.reshape(-1), rtol=1e-6)


def test_similarity_class_gradients_and_restore_match_torch_func(run):
    store, ref = run["store"], run["ref"]
    folder = report_paths(run["path"] / "s.zarr").epoch_dir(EPOCHS - 1)
    grads = ref.grads[EPOCHS - 1]
    flat = {
        sid: torch.cat([g.double().reshape(-1) for _, g in sorted(gs.items())]) for sid, gs in grads.items()
    }
    pairs = pd.read_csv(folder / "similarity_pairs.csv")
    for a, b, score in zip(pairs["id"], pairs["other"], pairs["score"]):
        want = float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm()))
        assert score == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert sorted(set(pairs["id"])) == [2, 7, 11]

    classes = pd.read_csv(folder / "class_gradients_classes.csv")
    labels = dict(zip(store.sample_ids(EPOCHS - 1), store.row_field(EPOCHS - 1, "label")))
    for c, count, norm in zip(classes["class"], classes["count"], classes["norm"]):
        members = [sid for sid in flat if labels[sid] == c]
        assert count == len(members)
        assert norm == pytest.approx(float(torch.stack([flat[s] for s in members]).sum(0).norm()), rel=1e-4)

    restored = pd.read_csv(folder / "restore_norms.csv")
    assert sorted(set(restored["id"])) == [4, 19]
    for sid, layer, param, norm in restored[["id", "layer", "param", "norm"]].itertuples(index=False):
        assert norm == pytest.approx(float(grads[sid][f"{layer}.{param}"].double().norm()), rel=1e-4)


def test_analytics_that_follow_chosen_samples_need_them(tmp_path):
    with pytest.raises(AnalyticsError, match=r"similarity\): give the samples to follow"):
        parse_analytics(["similarity"])
    with pytest.raises(AnalyticsError, match="`ids` must be a list of sample ids"):
        parse_analytics([{"restore": {"ids": [1, -2]}}])
    with pytest.raises(AnalyticsError, match="`metric` can be cosine or dot"):
        parse_analytics([{"topk": {"metric": "l2"}}])


def test_validating_analytics_imports_no_figures():
    # spec.py runs when the callback is built: matplotlib would cost every run its start-up time.
    code = (
        "import sys; from mstore_lightning.reports.spec import parse_analytics; "
        "parse_analytics(['norms', {'self_influence': {'k': 5}}]); "
        "print(sorted(m for m in sys.modules if m == 'matplotlib' or m.endswith('reports.figures')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_csv_logger_holds_the_scalars_at_each_epoch_end(run):
    path = run["loggers"][1].log_dir + "/metrics.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mstore/grad_norm/total/max")]
    assert [int(r["step"]) for r in rows] == run["steps"]
    for e, row in enumerate(rows):
        norms = [
            sum(float((g.double() ** 2).sum()) for g in grads.values()) ** 0.5
            for grads in run["ref"].grads[e].values()
        ]
        assert float(row["mstore/grad_norm/total/max"]) == pytest.approx(max(norms), rel=1e-4)
        assert float(row["mstore/grad_norm/total/median"]) == pytest.approx(np.median(norms), rel=1e-4)
        assert float(row["mstore/storage/rows"]) == 40
        assert 0 <= float(row["mstore/class_conflicts/opposing_share"]) <= 1


def test_log_metrics_calls_are_exact(run):
    calls = [
        c for c in run["calls"].call_args_list if any(k.startswith("mstore/storage/") for k in c.args[0])
    ]
    assert [c.kwargs["step"] for c in calls] == run["steps"]
    store = run["store"]
    for e, c in enumerate(calls):
        metrics = c.args[0]  # one call an epoch carries every operator's scalars
        assert {k for k in metrics if k.startswith(("mstore/storage/", "mstore/capture/"))} == {
            "mstore/storage/epoch_bytes",
            "mstore/storage/total_bytes",
            "mstore/storage/dedup_saved_disk_bytes",
            "mstore/storage/dedup_rows_as_references",
            "mstore/storage/ratio_vs_fp32",
            "mstore/storage/rows",
            "mstore/capture/rows_per_s",
            "mstore/capture/dropped_rows",
        }
        assert {
            "mstore/analytics/seconds",
            "mstore/self_influence/flagged_share",
            "mstore/cluster/sketch_error",
        } <= set(metrics)
        assert metrics["mstore/storage/epoch_bytes"] == store.nbytes_stored(e)
        assert metrics["mstore/capture/rows_per_s"] > 0
        assert metrics["mstore/capture/dropped_rows"] == store.dropped(e) == 0


def test_tensorboard_has_scalars_histograms_images_and_text(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        run["loggers"][0].log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    events = acc.Scalars("mstore/self_influence/max")
    assert [ev.step for ev in events] == run["steps"]
    assert events[-1].value == pytest.approx(
        max(reference_self_influence(run, EPOCHS - 1).values()), rel=1e-4
    )
    hist = acc.Histograms("mstore/grad_norm/net.0")
    assert [h.step for h in hist] == run["steps"]
    assert hist[0].histogram_value.num == 40
    folder = report_paths(run["path"] / "s.zarr").epoch_dir(EPOCHS - 1)
    for tag in ("mstore/norms/by_class", "mstore/class_conflicts/heatmap", "mstore/self_influence/grid"):
        images = acc.Images(tag)
        assert [im.step for im in images] == run["steps"]
        # The event holds the very PNG written beside the store, with its true size.
        png = (folder / f"{tag.split('/', 1)[1].replace('/', '_')}.png").read_bytes()
        assert images[-1].encoded_image_string == png
        from PIL import Image

        assert Image.open(io.BytesIO(png)).size == (images[-1].width, images[-1].height)
        assert images[-1].width > 100
    assert "mstore/self_influence/topk/text_summary" in tags["tensors"]


def test_mlflow_has_metrics_figures_and_tables(run):
    from mlflow.tracking import MlflowClient

    with mock.patch.dict("os.environ", {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        client = MlflowClient(f"file:{run['path'] / 'mlruns'}")
        history = client.get_metric_history(run["mlflow_run"], "mstore/grad_norm/total/max")
        assert [m.step for m in history] == run["steps"]
        files = [a.path for a in client.list_artifacts(run["mlflow_run"], "mstore/epoch_00001")]
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert {"norms_by_class.png", "class_conflicts_heatmap.png", "self_influence_topk.json"} <= names


def test_bad_analytics_fail_before_training(tmp_path):
    with pytest.raises(AnalyticsError, match="unknown operator 'nrms'.*norms"):
        GradientCapture(tmp_path / "s.zarr", analytics=["nrms"])
    with pytest.raises(AnalyticsError, match=r"self_influence\) has unknown parameter\(s\) top; it takes: k"):
        GradientCapture(tmp_path / "s.zarr", analytics=[{"self_influence": {"top": 3}}])
    with pytest.raises(AnalyticsError, match="`k` must be a positive integer"):
        parse_analytics([{"tracin": {"k": 0}}])
    with pytest.raises(ValueError, match="analytics_budget_s"):
        GradientCapture(tmp_path / "s.zarr", analytics=["norms"], analytics_budget_s=-1)
    assert not (tmp_path / "s.zarr").exists()


def test_analytics_from_yaml(tmp_path):
    spec = tmp_path / "analytics.yaml"
    spec.write_text("analytics:\n  - norms\n  - self_influence: {k: 7}\n  - {name: cluster, k: 4}\n")
    parsed = parse_analytics(spec)
    assert [(s.name, s.params.get("k")) for s in parsed] == [
        ("norms", None),
        ("self_influence", 7),
        ("cluster", 4),
    ]


def test_a_failing_analytic_does_not_stop_the_others_or_training(tmp_path, caplog):
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    cap = GradientCapture(
        tmp_path / "s.zarr", policy=EXACT, analytics=[{"norms": {"layers": ["nope"]}}, "storage"]
    )
    with caplog.at_level(logging.WARNING, logger="mstore_lightning"):
        trainer([cap], max_epochs=2).fit(Task(net()), loader(x, y))
    assert open_store(tmp_path / "s.zarr").epochs == [0, 1]
    summary = report_paths(tmp_path / "s.zarr").read_summary(1)
    assert [(r["name"], r["status"]) for r in summary["analytics"]] == [
        ("norms", "failed"),
        ("storage", "ok"),
    ]
    assert "unknown layer(s) nope" in summary["analytics"][0]["note"]
    assert any("analytic norms failed" in r.message for r in caplog.records)


def test_work_beyond_the_budget_is_skipped_with_a_note(tmp_path, caplog):
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    cap = GradientCapture(
        tmp_path / "s.zarr", policy=EXACT, analytics=["storage", "outliers"], analytics_budget_s=1e-9
    )
    with caplog.at_level(logging.WARNING, logger="mstore_lightning"):
        trainer([cap], max_epochs=1).fit(Task(net()), loader(x, y))
    summary = report_paths(tmp_path / "s.zarr").read_summary(0)
    assert [(r["name"], r["status"]) for r in summary["analytics"]] == [
        ("storage", "skipped"),
        ("outliers", "skipped"),
    ]
    assert all("budget of 1e-09 s was spent" in r["note"] for r in summary["analytics"])
    assert sum("budget" in r.message for r in caplog.records) == 2
    json.dumps(summary)


def test_wandb_offline_gets_images_and_tables(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    logger = WandbLogger(project="mstore-test", save_dir=str(tmp_path), offline=True)
    cap = GradientCapture(
        tmp_path / "s.zarr", policy=EXACT, analytics=[{"self_influence": {"k": 3, "image_shape": [4, 4]}}]
    )
    try:
        trainer([cap], max_epochs=2, logger=logger).fit(Task(net()), loader(x, y))
    finally:
        logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "mstore" / "self_influence").glob("grid_*.png"))) == 2
    tables = sorted((media / "table" / "mstore" / "self_influence").glob("topk_*.table.json"))
    assert len(tables) == 2
    csv_rows = pd.read_csv(report_paths(tmp_path / "s.zarr").epoch_dir(1) / "self_influence_topk.csv")
    logged = [json.loads(t.read_text()) for t in tables]
    assert any([row[1] for row in t["data"]] == csv_rows["id"].tolist() for t in logged)


def test_max_overhead_skips_epochs_always_reports_the_last_and_tracin_sums_the_reported(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    qx, qy = data(n=4, d=16, seed=3)
    cap = GradientCapture(
        tmp_path / "s.zarr",
        policy=EXACT,
        query=loader(qx, qy, batch_size=4, shuffle=False),
        analytics=[{"self_influence": {"k": 3}}, {"tracin": {"k": 16}}, "storage"],
        analytics_background=False,
        analytics_max_overhead=1e-6,  # far less than any report costs
    )
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path / "tb", name="", version="")
    trainer([cap], max_epochs=4, logger=tb).fit(Task(net()), loader(x, y))
    paths = report_paths(tmp_path / "s.zarr")
    summaries = [paths.read_summary(e) for e in paths.epochs()]
    # The cheap scalars reach TensorBoard for every captured epoch, skipped ones included: curves,
    # not two points. The norms kept at capture give the norm statistics without reading a row.
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = sorted({s["global_step"] for s in summaries})
    for tag in ("mstore/storage/rows", "mstore/grad_norm/total/mean", "mstore/outliers/flagged_share"):
        assert sorted({ev.step for ev in acc.Scalars(tag)}) == steps and len(steps) == 4, tag
    # Epoch 0 runs (no cost is known yet) and shows what a report costs; 1 and 2 cannot afford it;
    # the last is reported when fit ends.
    assert [("skipped" in s, len(s["analytics"])) for s in summaries] == [
        (False, 3),
        (True, 0),
        (True, 0),
        (False, 3),
    ]
    assert "analytics_max_overhead" in summaries[1]["skipped"]
    store = open_store(tmp_path / "s.zarr")
    # Self-influence, read from the norms kept at capture, sums every epoch, skipped ones included.
    table = pd.read_csv(paths.epoch_dir(3) / "self_influence_topk.csv")
    api = store.self_influence()
    np.testing.assert_allclose(table["score"], api.scores[np.searchsorted(api.ids, table["id"])], rtol=1e-6)
    # TracIn sums the reported epochs, as TracInCP sums its checkpoints, and says so.
    tracin = next(r for r in summaries[3]["analytics"] if r["name"] == "tracin")
    assert "2 reported epochs" in tracin["note"] and "2 epochs skipped" in tracin["note"]
    assert tracin["scalars"]["tracin/epochs_summed"] == 2.0
    table = pd.read_csv(paths.epoch_dir(3) / "tracin_proponents.csv")
    queries = store.sample_ids(3, "query")
    reported, every = store.tracin(queries, epochs=[0, 3]), store.tracin(queries)
    assert not np.allclose(reported.scores, every.scores)
    # Its value carries its own name, never "score" beside the CLI's every-epoch TracIn.
    assert "score" not in table.columns
    titles = [t["title"] for t in tracin["tables"]]
    assert any("TracIn over reported epochs 0, 3" in t for t in titles), titles
    for q, rows in table.groupby("query", sort=False):
        scores = reported.scores[list(queries).index(q)]
        np.testing.assert_allclose(
            rows["tracin_over_reported_epochs"], scores[np.searchsorted(reported.ids, rows["id"])], rtol=1e-6
        )
    assert "analytics_max_overhead" in paths.html.read_text()


def test_max_overhead_charges_each_report_with_its_html_rewrite(tmp_path, monkeypatch):
    import mstore_lightning.reports.html as report_html

    real = report_html.write_report

    def slow_html(*args, **kwargs):  # an HTML rewrite far dearer than the analytics and the epoch
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(report_html, "write_report", slow_html)
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    cap = GradientCapture(
        tmp_path / "s.zarr",
        policy=EXACT,
        analytics=["storage"],
        analytics_background=False,
        analytics_max_overhead=1.0,  # each epoch earns its own training time, well under a second
    )
    trainer([cap], max_epochs=4).fit(Task(net()), loader(x, y))
    paths = report_paths(tmp_path / "s.zarr")
    summaries = [paths.read_summary(e) for e in paths.epochs()]
    # Charged for its analytics alone (milliseconds), every epoch could afford a report.
    assert all(s["seconds"] < 0.5 for s in summaries)
    assert ["skipped" in s for s in summaries] == [False, True, True, False]


def test_a_report_process_that_dies_loses_its_reports_not_the_training_run(tmp_path, caplog):
    import lightning as L

    class KillWorker(L.Callback):  # after the capture's epoch end, which sends epoch 0 to the worker
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                for process in list(cap.reports._background._pool._processes.values()):
                    process.kill()
                    process.join()

    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    cap = GradientCapture(
        tmp_path / "s.zarr",
        policy=EXACT,
        analytics=["storage"],
        analytics_background=True,
    )
    with caplog.at_level(logging.WARNING):
        trainer([cap, KillWorker()], max_epochs=3).fit(Task(net()), loader(x, y))
    # Every epoch's rows are stored and committed; the reports of the dead worker are lost, said so.
    store = open_store(tmp_path / "s.zarr")
    assert store.epochs == [0, 1, 2] and all(store.row_count(e) == 16 for e in store.epochs)
    lost = [r for r in caplog.records if "the report process failed" in r.getMessage()]
    assert {1, 2} <= {int(r.args[0]) for r in lost}  # sent after it died; 0 may have finished


def test_overwriting_a_store_replaces_its_reports_and_appending_keeps_them(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    paths = report_paths(tmp_path / "s.zarr")

    def fit(epochs: int, mode: str, analytics: list | None = None, policy: dict = EXACT) -> None:
        cap = GradientCapture(tmp_path / "s.zarr", policy=policy, analytics=analytics, mode=mode)
        trainer([cap], max_epochs=epochs).fit(Task(net()), loader(x, y))

    fit(3, "error", ["storage"])
    assert paths.epochs() == [0, 1, 2]
    (paths.root / "notes.txt").write_text("mine")  # not the report's: it stays
    fit(1, "overwrite", ["storage"])
    assert paths.epochs() == [0]  # epochs 1 and 2 were the replaced run's
    assert (paths.root / "notes.txt").read_text() == "mine"
    html = paths.html.read_text()
    assert 'id="epoch-00000"' in html and 'id="epoch-00001"' not in html
    # Append adds epoch 1 (appending never re-captures a committed epoch); no analytics this time:
    # the reports already there are the store's own.
    fit(2, "append", policy={**EXACT, "epochs": [1]})
    assert paths.epochs() == [0] and paths.html.read_text() == html


def test_a_palette_png_reaches_tensorboard_as_pixels(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mstore_lightning.reports.loggers import _tensorboard_image

    buf = io.BytesIO()
    Image.new("P", (120, 30), color=3).save(buf, format="png")  # colour type 3: no channel count
    logger = TensorBoardLogger(tmp_path, name="tb")
    _tensorboard_image(logger, "mstore/x", buf.getvalue(), 7)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("mstore/x")
    assert (image.step, image.width, image.height) == (7, 120, 30)


def test_reports_that_cannot_be_removed_are_warned_about_and_training_goes_on(tmp_path, monkeypatch):
    from mstore_lightning.reports.artifacts import ReportPaths

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.root))

    monkeypatch.setattr(ReportPaths, "clear", refuse)
    torch.manual_seed(0)
    x, y = data(n=16, d=16)
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT, analytics=["storage"], mode="overwrite")
    with pytest.warns(UserWarning, match="could not remove the replaced store's reports"):
        trainer([cap], max_epochs=1).fit(Task(net()), loader(x, y))
    assert open_store(tmp_path / "s.zarr").epochs == [0]


SCRIPT = """
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from mstore_lightning import GradientCapture

print("script body", flush=True)


class Task(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 3)

    def training_step(self, batch, i):
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
capture = GradientCapture(
    {store!r}, mode="overwrite", analytics=["norms"], analytics_background=True, sample_ids=lambda b: b[2]
)
trainer = L.Trainer(
    max_epochs=2, callbacks=[capture], logger=False, enable_checkpointing=False, enable_progress_bar=False
)
trainer.fit(Task(), DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=16))
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_background_reports_from_a_script_without_a_main_guard_neither_run_it_again_nor_get_lost(
    tmp_path, guarded
):
    import subprocess
    import sys
    import textwrap

    body = SCRIPT.format(store=str(tmp_path / "s.zarr"))
    if guarded:  # the idiom: the worker imports the script, and only its definitions run
        head, tail = body.split("\nx, y =")
        body = head + '\nif __name__ == "__main__":\n' + textwrap.indent("x, y =" + tail, "    ")
    script = tmp_path / "train.py"
    script.write_text(body)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Unguarded, the worker started without the script: its body ran once, in this process only.
    assert run.stdout.count("script body") == (2 if guarded else 1)
    assert "the report process failed" not in run.stderr
    assert ("no `if __name__" in run.stderr) is not guarded
    assert report_paths(tmp_path / "s.zarr").epochs() == [0, 1]
