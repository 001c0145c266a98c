"""The table of the metrics DigitalMe's host tools write to node-exporter's textfile folder
(the restore drills' digitalme_backup_* and digitalme-deploy's digitalme_deploy_*), as
docs/operations/monitoring.md carries it: rendered by the tools' own code from a sample
result and parsed back, so a metric a tool writes cannot go undocumented
(tests/unit/test_metrics.py compares). Print it with:

    .venv/bin/python -m scripts.textfile_metrics
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tools import digitalme_deploy, drill_report

_SAMPLE_DRILL = {"ok": True, "rows": {"messages": 1}}
_SAMPLE_DEPLOY = {"result": "success", "finished_at": "2026-12-07T00:00:00+00:00", "kind": "deploy"}


def textfile_metrics_markdown() -> str:
    """One row per metric: name (with its labels), type, help; the drills' first."""
    lines = ["| Metric | Type | Written by | Meaning |", "| --- | --- | --- | --- |"]
    sources = (
        ("restore drills", drill_report.render_metrics(_SAMPLE_DRILL)),
        ("digitalme-deploy", digitalme_deploy.metrics_text(_SAMPLE_DEPLOY, [_SAMPLE_DEPLOY])),
    )
    for writer, text in sources:
        for family in text_string_to_metric_families(text):
            labels = sorted({key for sample in family.samples for key in sample.labels})
            suffix = "{" + ",".join(labels) + "}" if labels else ""
            name = f"{family.name}_total" if family.type == "counter" else family.name
            lines.append(
                f"| `{name}{suffix}` | {family.type} | {writer} | {family.documentation} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(textfile_metrics_markdown(), end="")
