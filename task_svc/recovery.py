"""Jobs delivered from SB_JOBS, and tasks rebuilt from them after a restart.

A job this process does not know was left by a previous incarnation (killed, or stopped
with it unacked): what SB_TASK_EVENTS stored for its task says whether it finished (the job
is only acked) or must run again, its seq continuing above anything a watcher may have seen
(task_server.py, checkpoints) and its first event a Progress saying the text restarts.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from svckit.nats import JOBS_SUBJECT_PREFIX
from switchboard.v1 import events_pb2
from task_svc.events import Stored
from task_svc.job import RESTARTED, Job
from task_svc.runner import Runner
from task_svc.task_state import TaskSpec

log = logging.getLogger(__name__)


class Recovery(Runner):
    def _on_msg(self, msg: Msg) -> asyncio.Task[None] | None:
        """A delivered job; returns the task rebuilding it when this process did not know it."""
        if self._stopping:
            self._spawn(msg.nak(), "nak-late-job")
            return None
        try:
            job_pb = events_pb2.Job.FromString(msg.data)
            if not job_pb.task_id:
                raise ValueError("job without task_id")
        except Exception:
            log.error("undecodable job terminated", extra={"subject": msg.subject})
            self._spawn(msg.term(), "term-bad-job")
            return None
        job = self._jobs.get(job_pb.task_id)
        if job is not None:
            job.msg = msg  # the newest delivery is the one to ack
            if job.server.core.terminal or job.finished.is_set():
                self._spawn(self._ack(msg), f"ack:{job.task_id}")
            else:
                self._maybe_schedule(job)
            return None
        server = self.registry.get(job_pb.task_id)
        if server is not None and server.core.terminal:
            self._spawn(self._ack(msg), f"ack:{job_pb.task_id}")
            return None
        queue = msg.subject.removeprefix(f"{JOBS_SUBJECT_PREFIX}.")
        job = self._new_job(TaskSpec.from_job(job_pb, queue))
        job.msg = msg
        return self._spawn(self._recover(job), f"recover:{job.task_id}")

    async def _recover(self, job: Job) -> None:
        """A job this process did not submit (left by a previous incarnation): finished
        tasks are only acked; the others run again, seq continuing above what was stored,
        with a first event telling watchers the text restarts."""
        stored = await self._stored(job.task_id)
        finished = stored is not None and stored.terminal
        if stored is not None and stored.terminal:
            assert stored.lifecycle is not None
            job.server.core.restore_terminal(stored.lifecycle)
        else:
            self._continue_seq(job, stored or Stored(0, job.spec.user_id, 0))
        stale = self.registry.get(job.task_id)
        if stale is not None:  # a rebuilt finished server, expired meanwhile or replaced
            self.registry.remove(stale)
        self._register(job)
        log.info("job recovered", extra={"task_id": job.task_id, "finished": finished})
        if finished:
            job.accepted.set_result(None)
            await self._finish(job, None)  # re-published: JetStream drops the duplicate id
            return
        await self._accept(job, RESTARTED)
