"""The MCP tools: thin typed functions over the lab. Their docstrings are the agent's manual.

No git, docker or SQL here: each tool finds the calling agent, calls the lab, and turns a
`LabError` (something the agent can fix) into a `ToolError` with the same message.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Literal, ParamSpec, TypeVar

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sandbox.errors import SandboxError

from server.errors import LabError
from server.models import (
    COMMITTED, BestResults, ExperimentResult, ExperimentState, LogText, PatchResult, ProgramText, ResetResult, RunList,
    RunStarted, RunStatus, TrainFile,
)

if TYPE_CHECKING:
    from server.runs import AppState

P = ParamSpec("P")
T = TypeVar("T")


def agent_of(ctx: Context) -> str:
    """The calling agent: the bearer token's agent over HTTP, the server's --agent over stdio."""
    request = ctx.request_context.request
    user = getattr(request, "user", None) if request is not None else None
    if isinstance(user, AuthenticatedUser):
        return user.access_token.client_id
    agent = ctx.request_context.lifespan_context.stdio_agent
    if agent is None:
        raise ToolError("this server has no agent identity; start it with --agent NAME or use a bearer token")
    return agent


def client_cancelled(ctx: Context) -> bool:
    """True when the client sent notifications/cancelled for this call, False when the call ended
    because the session or the server did. The SDK sets an event on the request's dispatch context
    but MCPServer's Context does not expose it yet (mcp 2.3): read it where the session keeps it,
    and where it cannot be found, count the call as cancelled by its client."""
    outbound = getattr(ctx.request_context.session, "_request_outbound", None)  # noqa: SLF001
    event = getattr(outbound, "cancel_requested", None)
    return event.is_set() if event is not None else True


def state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context


def lab_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Report our own errors as a ToolError, so the agent sees the message: LabError (something it
    can fix) and SandboxError (the host is broken: it should stop and tell its human)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if INVALID in kwargs:  # the arguments failed validation: AgentArguments put the sentence here
            raise ToolError(str(kwargs[INVALID]))
        try:
            return await fn(*args, **kwargs)
        except LabError as e:
            raise ToolError(str(e)) from e
        except SandboxError as e:
            raise ToolError(f"the sandbox failed (not your code's fault; tell the lab's owner): {e}") from e

    return wrapper


async def read_program(ctx: Context) -> ProgramText:
    """Read the research program (program.md): the human's instructions, goals and rules for this lab.

    Read it first. Also returns the fixed training budget of every experiment in seconds, and the
    lab's noise: σ (the spread of val_bpb over seeds), the runs it rests on, and the keep rule.
    """
    return state(ctx).lab.read_program()


async def read_train(ctx: Context) -> TrainFile:
    """Read your current train.py: the one file you may change.

    Returns its text, line count, the commit your branch points at (your best so far) and whether
    the file has patches not yet run. Other agents' files are not visible. Instant; no side effects.
    """
    return await state(ctx).lab.read_train(agent_of(ctx))


async def apply_patch(
    ctx: Context,
    diff: Annotated[str, Field(description="A unified diff of train.py only, as `git diff` writes it: "
                                           "'--- a/train.py' / '+++ b/train.py' headers and @@ hunks with context.")],
) -> PatchResult:
    """Apply a unified diff to your train.py (nothing runs; use run_experiment next).

    The diff must touch only train.py (no other paths, renames, new or deleted files, binary
    content), apply cleanly to the text read_train returns, stay under the size cap, and leave a
    file that compiles as Python (checked with compile(), never executed). A rejected diff changes
    nothing and the error says why. Patches accumulate until the next run_experiment; use
    reset_train to drop them. Returns the new line count and a diffstat against your best commit.
    """
    return await state(ctx).lab.apply_patch(agent_of(ctx), diff)


async def run_experiment(
    ctx: Context,
    description: Annotated[str, Field(description="A few words on what this experiment changes, e.g. "
                                                  "'double the learning rate'. Becomes the commit message.")],
) -> ExperimentResult:
    """Train your current train.py for the program's fixed budget and keep it if val_bpb beat the noise.

    Blocks for the whole run: the budget (read_program's budget_s, 300 s on the GPU program) plus
    start-up and evaluation, and any wait for the shared run slot; sends progress notifications at
    least every 10 s (queue position, phase, step, loss, tokens/s, seconds left). The run is
    sandboxed: no network, a hard deadline. val_bpb (validation bits per byte, lower is better) is
    measured by a separate trusted scorer on the model you submit (exported with torch.export), never
    by train.py's process.
    The keep rule: a run is kept only when its val_bpb beats your best by more than the lab's margin
    (keep_z, default 2, standard errors of σ, the spread over seeds; read_program states it), and a
    gain inside that band is first rerun at fresh seeds the harness picks (recorded as runs of their
    own, role confirm), the means deciding. The harness seeds every run (read cfg.seed; a train.py
    that seeds itself is refused as invalid), so the same train.py run again is a `rerun`: recorded,
    never kept or committed. The result reports delta, sigma, z and significant.
    Afterwards train.py is committed on your branch: if kept, the branch advances; otherwise it is
    discarded and train.py returns to your best (the attempt stays reachable by its commit). Your first
    run is your baseline. On crash / timeout / oom / invalid /
    unscorable the result carries the reason and the log tail: fix the cause and run again. Cancelling the call kills the
    run and records it as cancelled. For clients with short call limits use start_experiment.
    """
    agent = agent_of(ctx)

    async def report(elapsed_s: float, line: str) -> None:
        await ctx.report_progress(progress=round(elapsed_s, 1), total=None, message=line)

    # a client that cancels this call cancels the run; a server that goes away leaves it running
    return await state(ctx).runs.run(agent, description, report, cancelled_by_client=lambda: client_cancelled(ctx))


async def start_experiment(
    ctx: Context,
    description: Annotated[str, Field(description="A few words on what this experiment changes.")],
) -> RunStarted:
    """Start the same experiment as run_experiment in the background and return its run id at once.

    The run belongs to its own supervisor process: it goes on whatever happens to this client or
    this server, and any server of the lab can follow it. Block on it with wait_experiment(run_id),
    or poll get_experiment(run_id) every 30-60 s until finished is true; the result is the same as
    run_experiment's. train.py cannot be patched while the run is in flight; cancel_experiment stops it.
    """
    rec = await state(ctx).runs.start(agent_of(ctx), description)
    return RunStarted(run_id=rec.run_id, status=rec.status)


async def get_experiment(
    ctx: Context,
    run_id: Annotated[str, Field(description="A run id of yours, e.g. 'alice-0003'.")],
) -> ExperimentState:
    """Get one of your runs: its result when finished, its latest progress while queued or running.

    Works for any run of yours, whichever client or server started it. Instant; no side effects.
    """
    st = state(ctx)
    rec = st.lab.own_run(agent_of(ctx), run_id)
    finished = rec.status not in ("queued", "running")
    return ExperimentState(result=st.runs.result(rec), progress=None if finished else st.runs.progress_of(run_id),
                           finished=finished)


async def wait_experiment(
    ctx: Context,
    run_id: Annotated[str, Field(description="A run id of yours, e.g. 'alice-0003'.")],
) -> ExperimentResult:
    """Block until one of your runs (started here or by any other client) finishes; return its result.

    Sends progress notifications at least every 10 s, like run_experiment. Cancelling this call does
    NOT cancel the run (use cancel_experiment); a finished run returns at once.
    """
    st = state(ctx)
    rec = st.lab.own_run(agent_of(ctx), run_id)

    async def report(elapsed_s: float, line: str) -> None:
        await ctx.report_progress(progress=round(elapsed_s, 1), total=None, message=line)

    return await st.runs.wait(rec.run_id, report)


async def cancel_experiment(
    ctx: Context,
    run_id: Annotated[str, Field(description="A run id of yours that is queued or running.")],
) -> ExperimentResult:
    """Stop one of your runs in flight: its container is killed and it is recorded `cancelled` (nothing
    is committed). Returns the recorded result within seconds. A finished run cannot be cancelled.
    """
    st = state(ctx)
    rec = st.lab.own_run(agent_of(ctx), run_id)
    return await st.runs.cancel(rec.run_id, "cancelled by the client (cancel_experiment)")


async def get_best(ctx: Context) -> BestResults:
    """Get your best result and the best of the whole lab (all agents on this host).

    Each best has val_bpb (lower is better), run id, commit, description and the improvement over
    that agent's baseline (its first run); `noise` says how much a change must beat it by. Instant.
    """
    return state(ctx).lab.best(agent_of(ctx))


async def list_experiments(
    ctx: Context,
    status: Annotated[RunStatus | None,
                      Field(description="Only runs with this status; omit for all.")] = None,
    kept_only: Annotated[bool, Field(description="Only runs that were kept (each one a new best).")] = False,
    limit: Annotated[int, Field(description="At most this many runs, newest first (1-500).", ge=1, le=500)] = 20,
) -> RunList:
    """List your past experiments, newest first, one compact line each (status, val_bpb, delta, kept).

    Instant. Use get_log for one run's log.
    """
    return state(ctx).lab.list_runs(agent_of(ctx), status, kept_only, limit)


async def get_log(
    ctx: Context,
    run_id: Annotated[str, Field(description="A run id of yours, e.g. 'alice-0003'.")],
    lines: Annotated[int, Field(description="How many lines from the end (1-2000).", ge=1, le=2000)] = 100,
) -> LogText:
    """Read the last lines of one of your runs' logs (stdout and stderr of the training run). Instant."""
    return state(ctx).lab.log_tail(agent_of(ctx), run_id, lines)


async def reset_train(
    ctx: Context,
    to: Annotated[Literal["best", "baseline"], Field(
        description="'best': your best commit's train.py (drops unrun patches); 'baseline': the program's original.")],
) -> ResetResult:
    """Replace your train.py with your best version or the program's original baseline.

    Only the file changes; your branch and best stay where they are until the next run. Instant.
    """
    return await state(ctx).lab.reset_train(agent_of(ctx), to)


TOOLS = [read_program, read_train, apply_patch, run_experiment, start_experiment, get_experiment, wait_experiment,
         cancel_experiment, get_best,
         list_experiments, get_log, reset_train]


INVALID = "__invalid_arguments__"


class AgentArguments(FuncMetadata):
    """The SDK's argument validation, but a failure becomes one sentence the tool raises (as our own
    errors are raised), not pydantic's report with its input dump and documentation URL."""

    tool_name: str = ""

    def validate_arguments(self, arguments_to_validate: dict) -> dict:
        try:
            return super().validate_arguments(arguments_to_validate)
        except ValidationError as e:
            return {INVALID: self.sentence(e)}

    def sentence(self, e: ValidationError) -> str:
        fields = self.arg_model.model_fields
        parts = []
        for err in e.errors(include_url=False):
            name = ".".join(str(p) for p in err["loc"]) or "arguments"
            if err["type"] == "unknown_argument":
                parts.append(err["msg"])
                continue
            field = fields.get(str(err["loc"][0])) if err["loc"] else None
            about = f" ({field.description.rstrip('.')})" if field is not None and field.description else ""
            if err["type"] == "missing":
                parts.append(f"{self.tool_name} needs the argument {name!r}{about}")
            else:
                got = repr(err.get("input"))
                got = got if len(got) <= 60 else got[:57] + "..."
                parts.append(f"argument {name!r} of {self.tool_name}: {err['msg'][:1].lower()}{err['msg'][1:]}, "
                             f"got {got}{about}")
        return "; ".join(parts) + "; call it again with that fixed"


def _known_arguments(tool: str):
    """A before-validator naming an unknown argument and the ones the tool takes, in one sentence
    (pydantic's own message adds a documentation URL that means nothing to an agent)."""
    def check(cls, data):
        if isinstance(data, dict):
            allowed = [name for name in cls.model_fields if name != "ctx"]
            unknown = sorted(set(data) - set(allowed))
            if unknown:
                takes = ", ".join(allowed) if allowed else "no arguments"
                raise PydanticCustomError("unknown_argument", "unknown argument {unknown} for {tool}; it takes {takes}",
                                          {"unknown": ", ".join(map(repr, unknown)), "tool": tool, "takes": takes})
        return data

    return classmethod(check)


def register(mcp: MCPServer) -> None:
    """Add every tool; unknown arguments are rejected, not silently dropped."""
    for fn in TOOLS:
        mcp.add_tool(lab_errors(fn), name=fn.__name__, structured_output=True)
    for tool in mcp._tool_manager.list_tools():  # noqa: SLF001 - the SDK has no public knob for this
        model = tool.fn_metadata.arg_model
        strict = type(model.__name__, (model,), {"model_config": ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                                                 "__module__": model.__module__,
                                                 "_known": model_validator(mode="before")(_known_arguments(tool.name))})
        tool.fn_metadata = AgentArguments.model_construct(**{**dict(tool.fn_metadata), "arg_model": strict},
                                                         tool_name=tool.name)
        tool.parameters["additionalProperties"] = False
