"""Data-parallel training over many processes (one per GPU or CPU socket), launched by torchrun.

Every process (a *rank*) holds the whole model and the whole training tensor; what makes a
W-rank run equal to a one-process run with the same global batch ``B`` is that every rank
holds the *same global state* and only the work of a step is split:

* **data**: every rank draws the same permutation and the same global batch from the run's
  seeded generator (one permutation per epoch, a function of the seed and the epoch), runs
  ``batch_fn`` (dequantisation noise) on the whole global batch, and keeps its contiguous
  slice ``[B r / W, B (r + 1) / W)`` (:func:`shard_bounds`). The pre-processing is cheap CPU
  work; doing it for the global batch keeps every rank's generator in step and gives each row
  the noise it would get in one process.
* **gradients**: :class:`~torch.nn.parallel.DistributedDataParallel` averages them over the
  ranks during ``backward``. Each rank's mean loss is scaled by ``W n_r / B`` first, so the
  average is the gradient of the global-batch mean even when ``W`` does not divide ``B``.
* **context** (conditional flows): the context rows travel with the data rows, so each rank
  keeps the same slice of the global batch's contexts; the context standardisation is fitted
  on the whole training context on every rank (the same numbers everywhere).
* **metrics**: the step loss and the validation/test NLL (mean and standard error) are
  all-reduced sums, so every rank sees the global numbers and takes the same decisions
  (best weights, early stopping).
* **NaN guard**: the all-reduced loss is non-finite if any rank's is, and a non-finite
  gradient norm on any rank is all-reduced into a flag, so all ranks skip the same steps.
* **the loss**: every rank minimises the model's own objective,
  :meth:`~exactflow.Flow.training_loss` (the NLL plus every declared penalty, e.g. RNODE's,
  or flow matching's regression), the same function the one-process trainer calls. Penalties
  that are batch means of per-row terms (RNODE's are) therefore combine over ranks exactly
  like the NLL; with a fixed-step solver and the exact trace a regularised CNF trains as in
  one process (an adaptive solver picks its steps from each rank's own rows, so it matches
  up to the solver tolerance).
* **ActNorm**: the data-dependent initialisation uses the mean and variance of the *global*
  first batch: each uninitialised layer is initialised by ``ActNorm.initialize(x,
  reduce=all_reduce)`` from a forward pre-hook on the first step, two all-reduced passes
  (sum -> mean, sum of squared deviations -> variance), so it equals the one-process
  initialisation up to float rounding. Broadcasting rank 0's initialisation instead would use
  only ``B / W`` rows and break that equivalence.
* **EMA, optimiser, best weights, RNG state** are computed identically on every rank;
  only rank 0 writes files (checkpoints, model, metrics, plots).
* **checkpoints** hold only global state (no per-rank data position), so a run resumes on
  any number of ranks (that is at most ``B``) and continues the same sequence of global
  batches; rank 0 reads the file and broadcasts its bytes, so other nodes need no shared
  file system.

Not equal to one process: :class:`~exactflow.transforms.BatchNormFlow` normalises with
per-rank batch statistics (running averages follow rank 0, broadcast by DDP), and the MMD
penalty, Hutchinson trace probes and flow matching's times and noise are drawn per rank.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import errors
from ..errors import ConfigError, DTypeError, ExactflowError
from ..flow import Flow
from ..transforms.normalization import ActNorm
from .checkpoint import load_checkpoint, parse_checkpoint, read_checkpoint_bytes
from .ema import EMA
from .engine import TrainConfig, Trainer, _check_context, _rows
from .mmd import mmd2_rbf

__all__ = [
    "DistributedContext",
    "DistributedError",
    "DistributedTrainer",
    "current_context",
    "init_from_environment",
    "is_main_process",
    "launched_by_torchrun",
    "load_checkpoint_everywhere",
    "on_main",
    "session",
    "shard_bounds",
    "synchronized_actnorm_init",
]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ExactflowError, RuntimeError):
    """Rank 0 failed in a step every rank waits on (the message is rank 0's error)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the process group.

    Attributes:
        rank: global rank in ``[0, world_size)``; rank 0 writes every file.
        world_size: number of processes W.
        local_rank: rank on this machine (the GPU index with ``device = "cuda"``).
        local_world_size: processes on this machine.
        backend: the process group's backend string, e.g. ``"gloo"`` or
            ``"cpu:gloo,cuda:nccl"``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0

    def supports(self, device: torch.device) -> bool:
        """Whether collectives can run on tensors of ``device`` (gloo: CPU; NCCL or gloo: CUDA)."""
        if device.type == "cpu":
            return "gloo" in self.backend
        return "nccl" in self.backend or "gloo" in self.backend

    @property
    def comm_device(self) -> torch.device:
        """Where small bookkeeping collectives run: the CPU with gloo, else this rank's GPU."""
        if "gloo" in self.backend:
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank)

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """A copy of ``t`` reduced over all ranks (``op``: ``"sum"`` or ``"max"``), on ``t``'s device."""
        device = t.device if self.supports(t.device) else self.comm_device
        out = t.detach().to(device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return out.to(t.device)

    def run_on_main(self, fn: Callable[[], bytes | None]) -> bytes:
        """Run ``fn`` on rank 0 only and hand its bytes result to every rank.

        Every rank must call this at the same point. An exception raised by ``fn`` on rank 0
        is re-raised there and raised on every other rank too (the same exactflow error class
        or ``OSError``; :class:`DistributedError` for anything else), so no rank is left
        waiting in a later collective.
        """
        status, payload, failure = 0, b"", None
        if self.is_main:
            try:
                payload = fn() or b""
            except Exception as err:  # re-raised below, on every rank
                failure, status, payload = err, 1, _encode_error(err)
        header = torch.tensor([status, len(payload)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(header, src=0)
        status, size = (int(v) for v in header.tolist())
        if size:
            if self.is_main:
                buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                buf = buf.to(self.comm_device)
            else:
                buf = torch.empty(size, dtype=torch.uint8, device=self.comm_device)
            dist.broadcast(buf, src=0)
            payload = buf.cpu().numpy().tobytes()
        if status:
            if failure is not None:
                raise failure
            raise _decode_error(payload)
        return payload


def _encode_error(err: Exception) -> bytes:
    if isinstance(err, OSError):
        doc = {"kind": "os", "errno": err.errno, "strerror": err.strerror, "file": err.filename}
        if err.errno is None:
            doc["strerror"] = str(err)
    else:
        doc = {"kind": type(err).__name__, "message": str(err)}
    return json.dumps(doc).encode("utf-8")


def _decode_error(payload: bytes) -> Exception:
    doc = json.loads(payload.decode("utf-8"))
    if doc["kind"] == "os":
        if doc["errno"] is None:
            return OSError(doc["strerror"])
        return OSError(doc["errno"], doc["strerror"], doc["file"])
    cls = getattr(errors, doc["kind"], None)
    if isinstance(cls, type) and issubclass(cls, ExactflowError):
        return cls(doc["message"])
    return DistributedError(f"rank 0 failed: {doc['kind']}: {doc['message']}")


def launched_by_torchrun() -> bool:
    """Whether the environment names a process group to join (torchrun sets these variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE"))


def current_context() -> DistributedContext | None:
    """The context of the initialised default process group, or ``None`` without one.

    ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` come from the environment (torchrun sets them);
    without them the group is taken to be on one machine.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistributedContext(
        rank=rank,
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", rank),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
        backend=str(dist.get_backend()),
    )


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ConfigError(f"environment variable {name} must be an int, got {value!r}") from err


def init_from_environment() -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    The group gets gloo for CPU tensors and, where CUDA and NCCL are available, NCCL for
    CUDA tensors, so the same launch trains on CPUs or GPUs. Raises :class:`ConfigError`
    when ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` or ``MASTER_PORT`` is missing.
    """
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed support")
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ConfigError(
            f"cannot join a process group: {', '.join(missing)} not set; launch with torchrun"
        )
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    ctx = current_context()
    if ctx is None:  # pragma: no cover - init_process_group raises instead
        raise DistributedError("the process group did not initialise")
    return ctx


@contextmanager
def session() -> Iterator[DistributedContext | None]:
    """The data-parallel context for the duration of a run.

    An already initialised process group is used as it is; a process started by torchrun
    joins a new group (see :func:`init_from_environment`), destroyed on exit; anything else
    is a single process (``None``).
    """
    ctx = current_context()
    if ctx is not None or not launched_by_torchrun():
        yield ctx
        return
    ctx = init_from_environment()
    try:
        yield ctx
        # rank 0 writes metrics and plots after training; a rank that tore its group down
        # while rank 0 was still busy made rank 0's own teardown abort (SIGABRT, seen in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 of a process group, in a process torchrun started as rank 0, or alone."""
    ctx = current_context()
    if ctx is not None:
        return ctx.is_main
    return os.environ.get("RANK", "0") == "0"


def on_main(ctx: DistributedContext | None, fn: Callable[[], Any]) -> None:
    """Run ``fn`` for its effect on rank 0 only, raising its errors on every rank.

    ``ctx=None`` (one process) simply calls ``fn``.
    """
    if ctx is None:
        fn()
        return

    def call() -> None:
        fn()

    ctx.run_on_main(call)


def load_checkpoint_everywhere(
    path: str | Path, ctx: DistributedContext | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`~.checkpoint.load_checkpoint` read by rank 0 and broadcast to every rank."""
    if ctx is None:
        return load_checkpoint(path)
    raw = ctx.run_on_main(lambda: read_checkpoint_bytes(path))
    return parse_checkpoint(raw, path)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch of ``n`` rows that ``rank`` of ``world_size`` processes.

    ``lo = n r // W``: contiguous, disjoint, covering, sizes differing by at most one.
    """
    for name, v in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise DTypeError(f"{name} must be an int, got {type(v).__name__}")
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ConfigError(
            f"need n >= 0 and 0 <= rank < world_size, got n={n}, rank={rank}, "
            f"world_size={world_size}"
        )
    return n * rank // world_size, n * (rank + 1) // world_size


# -- data-dependent initialisation ------------------------------------------------------------
@contextmanager
def synchronized_actnorm_init(
    module: nn.Module, ctx: DistributedContext | None
) -> Iterator[list[ActNorm]]:
    """Within the block, uninitialised ActNorm layers of ``module`` initialise on the global batch.

    Each pending layer gets a forward pre-hook that calls ``layer.initialize(x,
    reduce=ctx.all_reduce)`` on its training input before its own forward runs (which then
    finds it initialised). Every rank must run the same forward passes inside the block.
    Yields the layers that were hooked; the hooks are removed on exit.
    """
    pending = [m for m in module.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
    if ctx is None or not pending:
        yield []
        return

    def initialize(layer: nn.Module, args: tuple) -> None:
        if layer.training and not bool(layer.initialized):
            layer.initialize(args[0], reduce=ctx.all_reduce)

    handles = [m.register_forward_pre_hook(initialize) for m in pending]
    try:
        yield pending
    finally:
        for h in handles:
            h.remove()


# -- the trainer ------------------------------------------------------------------------------
class _ShardObjective(nn.Module):
    """What DDP wraps: this rank's ``flow.training_loss`` and MMD penalty on its shard."""

    def __init__(self, flow: Flow, config: TrainConfig):
        super().__init__()
        self.flow = flow
        self.mmd_weight = config.mmd_weight
        self.mmd_samples = config.mmd_samples
        self.mmd_bandwidths = list(config.mmd_bandwidths) or None
        self.data_generator: torch.Generator | None = None
        self.sample_generator: torch.Generator | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # the one-process trainer's objective, so declared penalties (RNODE) are never lost
        mean = self.flow.training_loss(x, context, generator=self.data_generator)
        if self.mmd_weight > 0:
            samples = self.flow.rsample(self.mmd_samples, generator=self.sample_generator)
            penalty = mmd2_rbf(samples, x, self.mmd_bandwidths)
        else:
            penalty = mean.new_zeros(())
        return mean, penalty


class DistributedTrainer(Trainer):
    """:class:`~exactflow.train.Trainer` for one rank of a data-parallel run.

    Construct it on every rank with the same arguments: the same model initialisation and
    the same full data tensors (see the module docstring for what is split and what is
    shared). ``config.batch_size`` is the *global* batch ``B``, split over the W ranks, so
    the run follows the one-process run with batch ``B``. ``config.device``: ``"cpu"``,
    ``"cuda"``/``"auto"`` (this rank's GPU ``cuda:LOCAL_RANK``), or ``"cuda:N"`` with one
    process per machine. Every trainable parameter must receive a gradient from the loss
    (DDP's default bookkeeping; true of every model in :data:`exactflow.models.MODELS`).

    Args:
        flow, train, val, config, train_context, val_context, standardize_context, batch_fn, checkpoint, meta: as for ``Trainer`` (every rank passes the full context tensors).
        context: the process group (default: :func:`current_context`).

    Raises:
        ConfigError: no process group; fewer global rows than ranks; a device the group's
            backend cannot reduce on.
    """

    def __init__(
        self,
        flow: Flow,
        train: Tensor,
        val: Tensor | None = None,
        config: TrainConfig | None = None,
        *,
        train_context: Tensor | None = None,
        val_context: Tensor | None = None,
        standardize_context: bool | None = None,
        batch_fn: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        checkpoint: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        context: DistributedContext | None = None,
    ):
        ctx = context or current_context()
        if ctx is None:
            raise ConfigError(
                "DistributedTrainer needs an initialised process group: launch with torchrun "
                "and call exactflow.train.distributed.init_from_environment() (or use Trainer)"
            )
        self.dist = ctx
        config = config or TrainConfig()
        if not ctx.is_main and config.progress:
            config = replace(config, progress=False)  # one progress bar, rank 0's
        super().__init__(
            flow,
            train,
            val,
            config,
            train_context=train_context,
            val_context=val_context,
            standardize_context=standardize_context,
            batch_fn=batch_fn,
            checkpoint=checkpoint,
            meta=meta,
        )
        rows = min(self.config.batch_size, self.train_data.shape[0])
        if rows < ctx.world_size:
            raise ConfigError(
                f"a global batch of {rows} rows cannot be split over {ctx.world_size} ranks; "
                f"use batch_size >= {ctx.world_size} (and at least as many training rows)"
            )
        if not ctx.supports(self.device):
            raise ConfigError(
                f"the process group ({ctx.backend}) cannot reduce tensors on {self.device}; "
                "CPU training needs the gloo backend"
            )
        self.objective = _ShardObjective(self.flow, self.config)
        cpu_gen = torch.Generator()
        self.objective.data_generator = cpu_gen
        self.objective.sample_generator = (
            cpu_gen if self.device.type == "cpu" else torch.Generator(device=self.device)
        )
        # DDP broadcasts rank 0's weights and buffers now and averages gradients in backward
        self.ddp = nn.parallel.DistributedDataParallel(
            self.objective,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
        )
        if self.ema is not None:  # start the average from the broadcast weights
            self.ema = EMA(self.flow, self.config.ema)
        self._init_pending = True

    # -- hooks of Trainer ----------------------------------------------------------------------
    def _select_device(self, name: str) -> torch.device:
        ctx = self.dist
        if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        device = super()._select_device(name)  # checks that CUDA is there
        if name in ("auto", "cuda"):
            if ctx.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"local rank {ctx.local_rank} has no GPU ({torch.cuda.device_count()} "
                    "visible); start at most one process per GPU"
                )
            return torch.device("cuda", ctx.local_rank)
        if ctx.local_world_size > 1:
            raise ConfigError(
                f"device {name!r} puts all {ctx.local_world_size} processes of a machine on "
                "one GPU; use device = 'cuda' (each process takes cuda:LOCAL_RANK)"
            )
        return device

    def _next_batch(self) -> tuple[Tensor, Tensor | None]:
        x, context = self._next_rows()
        lo, hi = shard_bounds(x.shape[0], self.dist.rank, self.dist.world_size)
        shard = None if context is None else context[lo:hi]
        return self._to_device(x[lo:hi]), self._to_device(shard)

    def _step_seed(self) -> int:
        # per rank and step, so noise differs across ranks and needs no checkpointed state
        return ((self.config.seed * 1_000_003 + self.step) * 65_537 + self.dist.rank) % 2**62

    def _objective(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, float]:
        seed = self._step_seed()
        self.objective.data_generator.manual_seed(seed)
        if self.objective.sample_generator is not self.objective.data_generator:
            self.objective.sample_generator.manual_seed(seed)
        if self._init_pending:
            with synchronized_actnorm_init(self.flow, self.dist):
                mean, penalty = self.ddp(x, context)
            self._init_pending = False  # a training forward initialises every ActNorm
        else:
            mean, penalty = self.ddp(x, context)
        n = x.shape[0]
        stats = torch.stack(
            [mean.detach().double() * n, penalty.detach().double(), mean.new_tensor(n).double()]
        )
        total, penalties, rows = self.dist.all_reduce(stats).tolist()
        w, world = self.config.mmd_weight, self.dist.world_size
        value = total / rows + w * penalties / world
        # DDP divides the summed gradients by W; W n / B turns that into the global-batch mean
        loss = mean * (world * n / rows)
        if w > 0:
            loss = loss + w * penalty
        return loss, value

    def _clip_gradients(self) -> float:
        norm = super()._clip_gradients()
        bad = torch.tensor([0.0 if math.isfinite(norm) else 1.0], device=self.device)
        return math.nan if float(self.dist.all_reduce(bad, op="max")) > 0 else norm

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            super()._warn(message)

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = load_checkpoint_everywhere(path, self.dist)
        saved = int(meta.get("world_size", 1))
        if saved != self.dist.world_size and self.dist.is_main:
            warnings.warn(
                f"resuming a {saved}-process run on {self.dist.world_size} processes: the "
                "global batches stay the same; results match up to float rounding",
                RuntimeWarning,
                stacklevel=3,
            )
        return tensors, meta

    # -- overrides -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        meta["world_size"] = self.dist.world_size
        return tensors, meta

    def save(self, path: str | Path | None = None) -> None:
        """Rank 0 writes the checkpoint (every rank holds the same state); errors reach all ranks."""
        self.dist.run_on_main(lambda: Trainer.save(self, path))

    @torch.no_grad()
    def nll(
        self, data: Tensor, seed: int | None = None, *, context: Tensor | None = None
    ) -> tuple[float, float]:
        """Mean and standard error of ``-log p(x | c)`` over ``data``, each rank evaluating a
        slice.

        Every rank runs ``batch_fn`` on each whole chunk of ``eval_batch_size`` rows (so each
        row gets the noise it gets in one process) and evaluates its slice of the chunk (and
        of ``context``'s rows); the mean and the standard error come from all-reduced sums
        (two passes).
        """
        context = _check_context(self.flow, context, _rows(data, "data"), "data")
        g = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        was_training = self.flow.training
        self.flow.eval()
        values = [torch.zeros(0, dtype=torch.float64)]
        step = self.config.eval_batch_size
        try:
            for i in range(0, data.shape[0], step):
                x = self.batch_fn(data[i : i + step], g)
                lo, hi = shard_bounds(x.shape[0], self.dist.rank, self.dist.world_size)
                if hi > lo:
                    c = None if context is None else context[i : i + step][lo:hi]
                    x = self._to_device(x[lo:hi])
                    values.append(-self.flow.log_prob(x, self._to_device(c)).double().cpu())
        finally:
            self.flow.train(was_training)
        v = torch.cat(values)
        total, n = self.dist.all_reduce(torch.stack([v.sum(), v.new_tensor(v.numel())])).tolist()
        mean = total / n
        squares = float(self.dist.all_reduce(((v - mean) ** 2).sum().reshape(1)))
        se = math.sqrt(squares / (n - 1) / n) if n > 1 else math.nan
        return mean, se
