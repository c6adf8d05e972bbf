"""A store described in words: what ``GradientStore.describe()``, ``mstore inspect`` and the report show."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mstore_lightning.facade.info import StoreInfo


def describe(store: StoreInfo) -> str:
    """Epochs, layers, what each stores and why, bytes, and what is not captured."""
    lines = [f"gradient store {store.uri}", f"  epochs committed: {store.epochs}"]
    pol = store.policy
    lines.append(
        f"  precision {pol.get('precision')}, loss reduction {pol.get('loss_reduction')}, "
        f"layers {pol.get('layers')}"
    )
    plan = store.meta.get("plan")
    if plan:
        line = f"  storage plan (before compression): {plan['bytes_per_sample']:,} B/sample"
        if plan.get("rows_per_epoch") is not None:
            line += f", {plan['rows_per_epoch']:,} rows and {plan['bytes_per_epoch']:,} B an epoch"
        lines.append(line)
    for ep in store.epochs:
        line = f"  epoch {ep}: {store.row_count(ep)} rows, lr {store.lr(ep):.4g}"
        dedup = store.dedup_saved(ep).values()
        if any(d["rows_as_references"] for d in dedup):
            dups = sum(d["rows_as_references"] for d in dedup)
            raw = sum(d["uncompressed_bytes"] for d in dedup)
            disk = [d["disk_bytes"] for d in dedup if d["rows_as_references"]]
            on_disk = f"about {sum(disk):,} B on disk" if min(disk) >= 0 else "on disk: not estimable"
            line += (
                f", dedup stored {dups:,} input rows as references (saved {on_disk}; {raw:,} B uncompressed)"
            )
        lines.append(line)
    lines.append("  layers:")
    for name in store.layers:
        s = store.layer_spec(name)
        choice = s.get("choice", {})
        encodings = sorted({a["encoding"] for a in s["arrays"].values()})
        head = f"    {name} ({s['module_type']}): {choice.get('kept', s['representation'])}"
        lines.append(
            f"{head}, params {s['params']}, {choice.get('bytes_per_sample', 0):,} B/sample raw "
            f"({'/'.join(encodings)})"
        )
        if choice.get("reason"):
            lines.append(f"      why: {choice['reason']}")
        if choice.get("measured"):
            lines.append(f"      measured on the first batch: {explain_costs(choice['measured'])}")
        if s.get("full_method", "restore") != "restore" and s["representation"] == "full":
            lines.append(f"      full gradients formed by: {s['full_method']}")
        if store.approximate(name):
            lines.append(f"      approximate: {store.approximate(name)}")
        if s.get("fed_by"):
            of = ", ".join(f"{k} = {v}" for k, v in store.parameters(name).items())
            lines.append(f"      {s['fed_by']['role']} of {s['fed_by']['module']}: {of}")
        if s.get("broadcast"):
            lines.append(
                "      ids shared by the batch: its output is expanded to the batch during capture (a "
                "view), so each sample's output gradient (batch x positions x width numbers a step) is kept"
            )
        decision = store.meta.get("recompute", {}).get(name)
        if decision:
            lines.append(f"      store or recompute: {explain_decision(decision)}")
    if store.uncovered:
        lines.append("  not captured:")
        for u in store.uncovered:
            lines.append(
                f"    {u['module']}.{{{','.join(u['params'])}}} ({u['numel']} numbers): {u['reason']}"
            )
    lines.append(f"  bytes on disk: {store.nbytes_stored():,}")
    return "\n".join(lines)


def explain_costs(measured: dict[str, Any]) -> str:
    """A layer's measured costs of forming and writing each exact form (``choice["measured"]``)."""
    parts = []
    for form, cost in measured.items():
        if not isinstance(cost, dict):
            continue
        forming = ", ".join(
            f"{k.removeprefix('form_ms').lstrip('_') or 'form'} {v:.3g} ms"
            for k, v in cost.items()
            if k.startswith("form_ms")
        )
        if "total_ms" not in cost:  # not formed: its writes alone cost more than a cheaper form
            parts.append(f"{form}: write {cost['write_ms']:.3g} ms, more than the cheaper form's total")
            continue
        parts.append(f"{form}: {forming} + write {cost['write_ms']:.3g} ms = {cost['total_ms']:.3g} ms")
    rate = measured.get("write_mb_per_s")
    return "; ".join(parts) + (f" (writer at {rate:g} MB/s)" if rate else "")


def explain_decision(d: dict[str, Any]) -> str:
    """One store-or-recompute decision (``meta["recompute"][layer]``) in words."""
    if "gamma_s_per_gb" not in d:
        return f"{d['decision']} ({d.get('why', '')})"
    return (
        f"{d['decision']} after epoch {d['decided_after_epoch']}: gamma = (t_recompute "
        f"{d['t_recompute_s']:.3g} s - t_read {d['t_read_s']:.3g} s) x {d['expected_queries']} queries / "
        f"{d['bytes_per_sample']:,.0f} B = {d['gamma_s_per_gb']:.4g} s/GB vs threshold "
        f"{d['threshold_s_per_gb']:g} s/GB"
    )
