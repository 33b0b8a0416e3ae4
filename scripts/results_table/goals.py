"""The page's goals section, computed from the measured rows."""

from __future__ import annotations

from typing import Any

from .cells import _pct
from .rows import MODELS


def _checks(items: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, evaluated on the measured rows (honestly: ✗ where missed)."""
    lines = []
    by = {(i["model"], i["row"]): i for i in items if i["done"]}
    models = sorted({i["model"] for i in items}, key=list(MODELS).index)

    def acc(m: str, r: str) -> float | None:
        return by.get((m, r), {}).get("acc")

    def check(text: str, ok: bool | None) -> None:
        lines.append(f"- {'–' if ok is None else ('✓' if ok else '✗')} {text}")

    def mixed(m: str, *rows: str) -> str:
        # A carried row ran with older code (and maybe another machine): say so beside the mark.
        carried = [by[(m, r)].get("carried", False) for r in rows if (m, r) in by]
        if len(carried) == len(rows) and any(carried) and not all(carried):
            return "; compares a carried row (†) with a re-run one"
        return ""

    for m in models:
        f = acc(m, "float")
        if f is None:
            continue
        lines.append(f"\n**{m}** (float {100 * f:.2f}%):\n")
        for row, limit in (("qat_w8a8", 0.2), ("qat_w4a4", 1.0), ("qat_w2a2_anneal", 4.0)):
            a = acc(m, row)
            # Rounded as shown: accuracies are counts over 10,000 images, so 2 decimals are exact.
            gap = None if a is None else round(100 * (f - a), 2)
            text = "no result" if gap is None else f"{gap:.2f} pt below float"
            if gap is not None and gap < 0:
                text = f"{-gap:.2f} pt above float"
            check(f"{row}: {text} (goal ≤ {limit})", None if gap is None else gap <= limit)
        for auto, uniform in (("qat_auto_w4a4", "qat_w4a4"), ("qat_auto_w2a2", "qat_w2a2_anneal")):
            a, u = acc(m, auto), acc(m, uniform)
            if a is None:
                continue  # not run (the mixed rows are optional on the page)
            check(
                f"mixed at {uniform}'s size {_pct(a)}% vs uniform {_pct(u)}% (goal: at least as "
                f"good{mixed(m, auto, uniform)})",
                None if u is None else a >= u,
            )
            if auto == "qat_auto_w2a2" and m == "mobilenetv2" and u is not None and f > u:
                closed = (a - u) / (f - u)
                check(
                    f"mixed at W2A2 size closes {100 * closed:.0f}% of uniform W2A2's "
                    f"{100 * (f - u):.2f} pt gap to float (goal ≥ 50%)",
                    closed >= 0.5,
                )
        d, an = acc(m, "qat_w4a4"), acc(m, "qat_w4a4_anneal")
        check(
            f"annealed W4A4 {_pct(an)}% vs direct W4A4 {_pct(d)}% (goal: at least as good"
            f"{mixed(m, 'qat_w4a4', 'qat_w4a4_anneal')})",
            None if d is None or an is None else an >= d,
        )
        p = acc(m, "ptq_w4a4")
        check(
            f"QAT W4A4 {_pct(d)}% vs PTQ W4A4 {_pct(p)}% (goal: QAT above PTQ"
            f"{mixed(m, 'qat_w4a4', 'ptq_w4a4')})",
            None if d is None or p is None else d > p,
        )
        rows = [i for i in items if i["model"] == m and i["done"] and i["row"] != "float"]
        gaps, agree = [], []
        for i in rows:
            for k, name in (("ort", "ONNX Runtime"), ("ts", "TorchScript")):
                if i.get(f"{k}_acc") is not None:
                    gaps.append((round(abs(i[f"{k}_acc"] - i["acc"]) * 100, 2), i["row"], name))
                if i.get(f"{k}_agree") is not None:
                    agree.append((i[f"{k}_agree"], i["row"], name))
        if not gaps or not agree:
            check("exported accuracy within 0.1 pt: no exported rows yet", None)
            continue
        gap, agr = max(gaps), min(agree)
        check(
            "exported accuracy within 0.1 pt of fake-quant in every row: largest gap "
            f"{gap[0]:.2f} pt ({gap[1]}, {gap[2]})",
            gap[0] <= 0.1,
        )
        # The pipeline's parity check is stricter than the goal: top-1 agreement too.
        check(
            "parity check, top-1 agreement ≥ 99.9% in every row: lowest "
            f"{100 * agr[0]:.2f}% ({agr[1]}, {agr[2]})",
            agr[0] >= 0.999,
        )
    return lines
