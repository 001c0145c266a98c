"""The docs' measured figures are the end-to-end tests' own output (scripts/measurements.py):
each measured block is what its copy in docs/measured/ renders, every figure there is
described, and every copy is shown somewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import measurements


def test_every_block_is_what_its_copy_renders() -> None:
    rendered = measurements.rendered_docs()
    assert rendered, "no doc has a measured block"
    stale = [
        str(path.relative_to(measurements.REPO))
        for path, (text, new) in rendered.items()
        if text != new
    ]
    assert stale == [], f"run: python -m scripts.measurements write ({stale})"


def test_every_copy_is_described_and_shown() -> None:
    copies = sorted(measurements.MEASURED.glob("*.json"))
    assert copies
    shown = {
        match["source"]
        for path in measurements.docs_with_blocks()
        for match in measurements.BLOCK.finditer(path.read_text())
    }
    for copy in copies:
        source = copy.stem
        assert source in measurements.FIGURES, f"{copy}: no such source"
        assert source in shown, f"{copy}: no doc shows it (<!-- measured: {source} -->)"
        figures = json.loads(copy.read_text())["figures"]
        assert figures and measurements.undescribed(source, figures) == []


def test_patterns_name_what_they_match() -> None:
    assert measurements.describe("monitoring", "fault_to_firing_LitestreamDown_seconds")[1:] == (
        "fault to `LitestreamDown` notified (firing)",
        "s",
    )
    assert measurements.describe("monitoring", "fault_to_firing__seconds") is None
    assert measurements.describe("site", "exposure_caddy")[1:] == (
        "`systemd-analyze security` exposure of `caddy`",
        "score",
    )
    assert measurements.describe("site", "no_such_figure") is None


def test_record_copies_artifacts_and_refuses_an_undescribed_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(measurements, "MEASURED", tmp_path / "measured")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "acme-timings.json").write_text(
        json.dumps({"site_fresh_seconds": 84.7, "requests_during_renewal": 225})
    )
    assert measurements.record(artifacts) == ["acme"]
    copy = json.loads((tmp_path / "measured" / "acme.json").read_text())
    assert copy["figures"] == {"site_fresh_seconds": 84.7, "requests_during_renewal": 225}
    table = measurements.render("acme", copy)
    assert "| `site.yml` on a fresh app host, certificate over HTTP-01 | 84.7 s |" in table
    assert "| requests during a renewal (all verified, none failed) | 225 |" in table
    # Rows follow FIGURES' order, not the file's.
    assert table.index("site_fresh_seconds") < table.index("requests_during_renewal")

    (artifacts / "acme-timings.json").write_text(json.dumps({"something_new_seconds": 1.0}))
    with pytest.raises(SystemExit, match="something_new_seconds"):
        measurements.record(artifacts)
