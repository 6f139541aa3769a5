"""`python -m gateway_svc.client "Tell me a story"`: one generation through the gateway, as a
Swift app does it (V2, a heartbeat every 30 s, one `task:<uuid4>` channel, `llm_generate`),
with a live progress bar and the text as it streams.

`python -m gateway_svc.client history [list | show <task_id> | delete <task_id>]`: the user's
history over the same socket (the `user:<id>` channel).

Exit status: 0 on `llm_response`; 1 when the task failed or was cancelled; 2 when the
connection failed or was lost; 3 when the join or the request was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.text import Text
from websockets.exceptions import InvalidHandshake

from gateway_svc import tokens
from gateway_svc.config import Settings
from gateway_svc.phoenix import PHX_CLOSE, PHX_ERROR
from gateway_svc.phoenix_client import (
    Channel,
    ConnectionLost,
    JoinRefused,
    PhoenixClient,
    PhoenixError,
    PushTimeout,
)

REJOIN_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # phoenix.js's rejoin schedule
MAX_CRASHES = 5


class Failed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class View:
    """The live display: streamed text above a progress bar."""

    def __init__(self) -> None:
        self.text = Text()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()
        )
        self.bar = self.progress.add_task("queued", total=1.0)

    def render(self) -> Group:
        return Group(self.text, self.progress)

    def on_progress(self, payload: dict[str, Any]) -> None:
        status = str(payload.get("status", ""))
        if status == "queued" and payload.get("position"):
            status = f"queued (position {payload['position']})"
        if payload.get("reset"):
            # The task runs again from the start: a retry, a rerun after an outage of ours,
            # or task_svc recovered it.
            self.text = Text()
            status = f"{status} (restarted: {payload.get('reason', '')})"
        fallback = payload.get("fallback")
        if isinstance(fallback, dict):
            status = f"{status} (continued by {fallback.get('model')})"
        value = payload.get("progress")
        completed = float(value) if isinstance(value, int | float) else None
        self.progress.update(self.bar, description=status, completed=completed)


async def run(args: argparse.Namespace, console: Console) -> None:
    token = args.token or tokens.mint(args.user, tokens.secret_from(Settings()), ttl=3600)
    try:
        client = await PhoenixClient.connect(args.url, token=token)
    except (OSError, InvalidHandshake, TimeoutError) as error:
        raise Failed(2, f"cannot connect to {args.url}: {error}") from None
    topic = f"task:{uuid.uuid4()}"
    view = View()
    async with client:
        channel = await _join(client, topic, 0)
        request: dict[str, Any] = {"prompt": args.prompt}
        if args.model:
            request["model"] = args.model
        if args.priority is not None:
            request["priority"] = args.priority
        reply = await channel.push("llm_generate", request)
        if not reply.ok:
            raise Failed(3, f"request refused: {_describe(reply.response)}")
        with Live(view.render(), console=console, refresh_per_second=12, transient=False) as live:
            final = await _follow(client, channel, view, live)
        usage = final.get("usage") or {}
        console.print(
            f"\n[bold]model[/] {final.get('model')}  [bold]tokens[/] "
            f"{usage.get('prompt_tokens')} in, {usage.get('completion_tokens')} out, "
            f"{usage.get('total_tokens')} total  [bold]finish[/] {final.get('finish_reason')}"
        )


async def _join(client: PhoenixClient, topic: str, last_seq: int) -> Channel:
    try:
        return await client.join(topic, {"last_seq": last_seq})
    except JoinRefused as refused:
        raise Failed(3, f"join refused: {_describe(refused.response)}") from None


async def _follow(
    client: PhoenixClient, channel: Channel, view: View, live: Live
) -> dict[str, Any]:
    """Render pushes until the task ends; after phx_error, rejoin with last_seq and go on."""
    last_seq = 0
    text_seq = 0  # chunks up to this seq are already in view.text
    rejoins = 0
    while True:
        async for push in channel.messages():
            payload = push.payload
            if isinstance(payload.get("seq"), int):
                last_seq = max(last_seq, payload["seq"])
            match push.event:
                case "progress":
                    view.on_progress(payload)
                    if payload.get("status") == "cancelled":
                        raise Failed(1, "the task was cancelled")
                case "chunk":
                    # Text already in the rejoin's state is not appended twice.
                    if not isinstance(payload.get("seq"), int) or payload["seq"] > text_seq:
                        view.text.append(str(payload.get("delta", "")))
                case "llm_response":
                    view.text = Text(str(payload.get("content", "")))
                    view.progress.update(view.bar, description="completed", completed=1.0)
                    live.update(view.render(), refresh=True)
                    return payload
                case "error":
                    raise Failed(1, f"generation failed: {_describe(payload)}")
                case event if event == PHX_CLOSE:
                    raise Failed(2, "the server closed the channel")
                case event if event == PHX_ERROR:
                    rejoins += 1
                    if rejoins > MAX_CRASHES:
                        raise Failed(2, "the channel kept failing")
                    channel = await _rejoin(client, channel.topic, last_seq)
                    # The rejoin's state holds the text up to its seq: start from it.
                    state = channel.join_response
                    view.text = Text(str(state.get("content", "")))
                    text_seq = state.get("seq", 0) if isinstance(state.get("seq"), int) else 0
                    break
            live.update(view.render())
        else:
            raise Failed(2, "the channel ended")


async def _rejoin(client: PhoenixClient, topic: str, last_seq: int) -> Channel:
    """Rejoin after phx_error as phoenix.js does (1, 2, 5, 10 s), catching up from last_seq;
    a refusal other than `unauthorized` (task_svc restarting) is retried."""
    reason = "no answer"
    for delay in REJOIN_BACKOFF_S:
        await asyncio.sleep(delay)
        try:
            return await client.join(topic, {"last_seq": last_seq})
        except JoinRefused as refused:
            if refused.response.get("reason") == "unauthorized":
                raise Failed(3, "rejoin refused: unauthorized") from None
            reason = _describe(refused.response)
        except PushTimeout:
            reason = "no answer"
    raise Failed(2, f"could not rejoin {topic}: {reason}")


async def history(args: argparse.Namespace, console: Console) -> None:
    """list, show or delete the user's tasks through the `user:<id>` channel."""
    token = args.token or tokens.mint(args.user, tokens.secret_from(Settings()), ttl=3600)
    try:
        client = await PhoenixClient.connect(args.url, token=token)
    except (OSError, InvalidHandshake, TimeoutError) as error:
        raise Failed(2, f"cannot connect to {args.url}: {error}") from None
    async with client:
        try:
            channel = await client.join(f"user:{args.user}")
        except JoinRefused as refused:
            raise Failed(3, f"history refused: {_describe(refused.response)}") from None
        if args.action == "list":
            reply = await channel.push("list_tasks", {"limit": args.limit})
        elif args.action == "show":
            reply = await channel.push("get_task", {"task_id": args.task_id})
        else:
            reply = await channel.push("delete_task", {"task_id": args.task_id})
        if not reply.ok:
            raise Failed(3, f"{args.action} refused: {_describe(reply.response)}")
    _print_history(args.action, reply.response, console)


def _print_history(action: str, response: dict[str, Any], console: Console) -> None:
    if action == "list":
        for task in response["tasks"]:
            preview = (task.get("preview") or "").replace("\n", " ")[:60]
            console.print(
                f"{task['task_id']}  [bold]{task['status']:<10}[/] {task['created_at']}  "
                f"{task['prompt'][:40]!r} → {preview}"
            )
        if not response["tasks"]:
            console.print("no tasks")
    elif action == "show":
        task = response["task"]
        console.print(f"[bold]{task['status']}[/] {task['model']}  {task['prompt']!r}")
        console.print(task["content"])
        for step in response["trail"]:
            console.print(f"  {step['seq']:>5} {step['kind']:<10} {step['at']}")
    else:
        console.print("deleted" if response["deleted"] else "no such task")


def parse_history_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_svc.client history", description="The user's history."
    )
    parser.add_argument("action", nargs="?", default="list", choices=["list", "show", "delete"])
    parser.add_argument("task_id", nargs="?")
    parser.add_argument("--url", default="ws://127.0.0.1:4000/socket")
    parser.add_argument("--user", default="dev", help="the user (a development token is minted)")
    parser.add_argument("--token", help="a socket token of --user instead")
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args(argv)
    if args.action != "list" and not args.task_id:
        parser.error(f"{args.action} needs a task id")
    return args


def _describe(response: dict[str, Any]) -> str:
    reason = response.get("reason") or response.get("code") or "error"
    message = response.get("message")
    return f"{reason}: {message}" if message else str(reason)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_svc.client", description="Stream one generation."
    )
    parser.add_argument("prompt", nargs="?", default="Tell me a story")
    parser.add_argument("--url", default="ws://127.0.0.1:4000/socket")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", help="a socket token (default: mint a dev token)")
    auth.add_argument("--user", default="dev", help="mint a development token for this user")
    parser.add_argument("--model")
    parser.add_argument("--priority", type=int, choices=range(10), metavar="0-9")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    if argv[:1] == ["history"]:
        args, command = parse_history_args(argv[1:]), history
    else:
        args, command = parse_args(argv), run
    try:
        asyncio.run(command(args, console))
    except Failed as failure:
        console.print(f"[red]{failure}[/]")
        sys.exit(failure.status)
    except ConnectionLost as lost:
        console.print(f"[red]connection lost (close code {lost.code})[/]")
        sys.exit(2)
    except tokens.SecretConfigError as error:
        console.print(f"[red]{error}[/]")
        sys.exit(2)
    except PhoenixError as error:
        console.print(f"[red]{error}[/]")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
