"""Checks every GenerateEvent stream must pass (llm.proto's promises)."""

from __future__ import annotations

from switchboard.v1 import llm_pb2


def kinds(events: list[llm_pb2.GenerateEvent]) -> list[str]:
    return [str(event.WhichOneof("kind")) for event in events]


def check_stream(events: list[llm_pb2.GenerateEvent]) -> llm_pb2.GenerateEvent:
    """Exactly one terminal event, last; progress monotonic in 0..1; on success, progress
    ends at exactly 1.0 just before the final, whose content is the deltas joined.
    Returns the terminal event."""
    names = kinds(events)
    terminals = [n for n in names if n in ("final", "error")]
    assert len(terminals) == 1 and names[-1] in ("final", "error"), names
    progress = [e.progress.progress for e in events if e.HasField("progress")]
    assert progress == sorted(progress) and all(0.0 <= p <= 1.0 for p in progress), progress
    last = events[-1]
    if last.HasField("final"):
        assert names[-2] == "progress" and events[-2].progress.progress == 1.0
        assert progress.count(1.0) == 1
        deltas = "".join(e.delta.text for e in events if e.HasField("delta"))
        assert deltas == last.final.content
    return last
