"""Checks every GenerateEvent stream must pass (llm.proto's promises)."""

from __future__ import annotations

from switchboard.v1 import llm_pb2


def kinds(events: list[llm_pb2.GenerateEvent]) -> list[str]:
    return [str(event.WhichOneof("kind")) for event in events]


def progress_reports(events: list[llm_pb2.GenerateEvent]) -> list[llm_pb2.GenerationProgress]:
    """Every progress of a stream: progress events and the progress riding in deltas."""
    reports = []
    for event in events:
        if event.HasField("progress"):
            reports.append(event.progress)
        elif event.HasField("delta") and event.delta.HasField("progress"):
            reports.append(event.delta.progress)
    return reports


def progress_values(events: list[llm_pb2.GenerateEvent]) -> list[float]:
    return [report.progress for report in progress_reports(events)]


def check_stream(events: list[llm_pb2.GenerateEvent]) -> llm_pb2.GenerateEvent:
    """Exactly one terminal event, last; progress monotonic in 0..1; on success, progress
    ends at exactly 1.0 just before the final, whose content is the deltas joined.
    Returns the terminal event."""
    names = kinds(events)
    terminals = [n for n in names if n in ("final", "error")]
    assert len(terminals) == 1 and names[-1] in ("final", "error"), names
    progress = progress_values(events)
    assert progress == sorted(progress) and all(0.0 <= p <= 1.0 for p in progress), progress
    last = events[-1]
    if last.HasField("final"):
        assert progress_values(events[-2:-1]) == [1.0], names
        assert progress.count(1.0) == 1
        deltas = "".join(e.delta.text for e in events if e.HasField("delta"))
        assert deltas == last.final.content
    return last
